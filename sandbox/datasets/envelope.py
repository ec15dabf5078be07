"""The envelope format (version 2) shared by :mod:`sandbox.datasets.store`.

File layout (integers big-endian)::

    b"SBXENC2\\n"                       magic, 8 bytes
    header_len                          uint32
    header                              JSON, UTF-8, sorted keys: format (2), dataset_id,
                                        version, chunk_size, payload ("parquet-zstd"),
                                        file_id (random, 128 bit)
    records                             [ nonce (12) | ciphertext | tag (16) ] ...

The Parquet payload is cut into chunks of ``chunk_size`` plaintext bytes; every chunk
but the last is full, and the last (final) chunk holds 0..``chunk_size`` bytes.  So the
plaintext length follows from the file length and nothing in the header has to be
known before the payload is written: the file is produced in one streaming pass.

Online authenticated encryption (the STREAM construction of Hoang, Reyhanitabar,
Rogaway and Vizár, 2015): chunk ``i`` is sealed with AES-256-GCM under the data key, a
random nonce, and associated data ``b"SBXENC2-chunk" | sha256(magic | header_len |
header) | i (uint64) | final (1 byte)``.  Hence:

* a bit flip anywhere (header, nonce, ciphertext, tag) fails authentication;
* reordering changes ``i``; a chunk swapped in from another file fails on the header
  digest (the random ``file_id`` differs even for the same dataset, version and key);
* truncation at a chunk boundary leaves a last chunk sealed with ``final = 0``, and
  dropping the final chunk likewise, so both fail; a cut inside a chunk fails its tag;
* a header edited to name another dataset or version changes the digest, so every
  chunk fails (and the reader refuses a header naming the wrong version first).

Format 1 (Arrow IPC with a chunk count in the header) is gone: nothing was deployed.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import threading
from typing import Any, BinaryIO

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CHUNK_SIZE",
    "FORMAT_VERSION",
    "LEN",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_HEADER_BYTES",
    "NONCE",
    "PAYLOAD",
    "TAG",
    "EncryptingSink",
    "Fail",
    "IntegrityError",
    "aad",
    "decrypt_records",
    "header_prefix",
    "layout",
    "parse_header",
]

MAGIC = b"SBXENC2\n"
FORMAT_VERSION = 2
PAYLOAD = "parquet-zstd"
#: Plaintext bytes per chunk.
CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
NONCE = 12
TAG = 16
LEN = struct.Struct(">I")
_AAD_TAIL = struct.Struct(">QB")
_HEADER_KEYS = frozenset({"format", "dataset_id", "version", "chunk_size", "payload", "file_id"})


class IntegrityError(Exception):
    """A stored file is not the expected, untampered dataset version.

    The message names the expected dataset id and version and the reason; it never
    contains plaintext.
    """


def aad(header_digest: bytes, index: int, final: bool) -> bytes:
    return b"SBXENC2-chunk" + header_digest + _AAD_TAIL.pack(index, int(final))


def header_prefix(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + LEN.pack(len(body)) + body


class EncryptingSink:
    """Write-only binary file object: seals every ``chunk_size`` bytes written as one
    record and appends it to ``out``; :meth:`finish` seals the final chunk.

    ``pq.ParquetWriter`` writes to it through ``write`` and ``tell``. With ``checksum``
    (the default) :attr:`hasher` is the SHA-256 of everything written to ``out``; without
    it (upload spools, which keep no checksum) it is ``None`` and no time goes to it.
    """

    def __init__(self, out: BinaryIO, prefix: bytes, data_key: bytes, chunk_size: int,
                 *, checksum: bool = True) -> None:
        self._out = out
        self._digest = hashlib.sha256(prefix).digest()
        self._aead = AESGCM(bytes(data_key))
        self._chunk_size = chunk_size
        self._pending = bytearray(chunk_size)  # plaintext not yet sealed
        self._fill = 0
        self._record = bytearray(NONCE + chunk_size + TAG)
        self.hasher = hashlib.sha256(prefix) if checksum else None
        self.position = 0  # plaintext bytes written
        self.chunks = 0
        self.closed = False
        self.aborted = False
        out.write(prefix)

    # -- file-object protocol used by pyarrow --------------------------------------------

    def write(self, data: Any) -> int:
        if self.aborted:  # a failed write: let the Parquet writer close without effect
            return len(memoryview(data))
        if self.closed:
            raise ValueError("write to a finished encrypted sink")
        view = memoryview(data).cast("B")
        n = view.nbytes
        while view.nbytes:
            take = min(view.nbytes, self._chunk_size - self._fill)
            self._pending[self._fill : self._fill + take] = view[:take]
            self._fill += take
            view = view[take:]
            if self._fill == self._chunk_size:
                self._seal(final=False)
        self.position += n
        return n

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def close(self) -> None:
        """Called by pyarrow when the Parquet writer closes; sealing is :meth:`finish`."""

    # -- sealing --------------------------------------------------------------------------

    def _seal(self, *, final: bool) -> None:
        n = self._fill
        record = memoryview(self._record)[: NONCE + n + TAG]
        nonce = secrets.token_bytes(NONCE)
        record[:NONCE] = nonce
        plain = memoryview(self._pending)[:n]
        self._aead.encrypt_into(nonce, plain, aad(self._digest, self.chunks, final), record[NONCE:])
        if self.hasher is not None:
            self.hasher.update(record)
        self._out.write(record)
        self.chunks += 1
        self._fill = 0

    def finish(self) -> None:
        """Seal the final chunk (possibly empty) and zero the plaintext staging buffer."""
        self._seal(final=True)
        self.closed = True
        self.wipe()

    def wipe(self) -> None:
        np.frombuffer(self._pending, dtype=np.uint8).fill(0)


class Fail:
    """Builds :class:`IntegrityError` messages naming the expected dataset version."""

    def __init__(self, dataset_id: str, version: int) -> None:
        self.what = f"encrypted file for dataset {dataset_id!r} version {version}"

    def __call__(self, reason: str) -> IntegrityError:
        return IntegrityError(f"{self.what} failed the integrity check: {reason}")


def parse_header(raw: bytes, fail: Fail) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise fail("header is not valid JSON") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise fail("header has unexpected fields")
    ints = ("format", "version", "chunk_size")
    if any(isinstance(header[k], bool) or not isinstance(header[k], int) for k in ints):
        raise fail("header field types are wrong")
    if header["format"] != FORMAT_VERSION or header["payload"] != PAYLOAD:
        raise fail(f"unsupported format {header['format']!r} / payload {header['payload']!r}")
    if not 0 < header["chunk_size"] <= MAX_CHUNK_SIZE:
        raise fail("header chunk size is out of range")
    return header


def layout(body: int, chunk_size: int, fail: Fail) -> tuple[int, int]:
    """``(chunk_count, plaintext_bytes)`` implied by ``body`` bytes of records: full
    chunks and then one final chunk of 0..chunk_size bytes."""
    record = NONCE + chunk_size + TAG
    full, rest = divmod(body, record)
    if rest == 0 and full > 0:
        return full, full * chunk_size
    if rest < NONCE + TAG:
        raise fail(f"file is truncated or extended ({body} bytes of chunks do not add up)")
    return full + 1, full * chunk_size + rest - NONCE - TAG


def decrypt_records(
    body: memoryview, aead: AESGCM, digest: bytes, out: Any, count: int, chunk_size: int,
    fail: Fail, *, threads: int = 2,
) -> None:
    """Authenticate and decrypt ``count`` records from ``body`` (the file after its header)
    into ``out`` (any writable buffer of the plaintext size: a ``bytearray`` or an mmap).

    Chunks are independent, so they are decrypted on up to ``threads`` threads (the AEAD
    releases the GIL), each taking the next chunk not yet taken (a thread slowed by other
    load holds up at most one chunk). Every chunk is authenticated before the call
    returns; on the first failure the other threads stop taking chunks, and the call
    raises once all of them have stopped writing to ``out``, naming the lowest failed
    chunk (the first bad one: chunks are taken in order and every taken chunk is tried).
    """
    out_view = memoryview(out)
    size = len(out_view)
    pending = iter(range(count))
    take = threading.Lock()
    failed = threading.Event()

    def one(i: int) -> None:
        begin = i * chunk_size
        n = min(chunk_size, size - begin)
        start = i * (NONCE + chunk_size + TAG)
        rec = body[start : start + NONCE + n + TAG]
        if len(rec) != NONCE + n + TAG:
            raise fail(f"file is truncated in chunk {i} of {count}")
        try:
            aead.decrypt_into(
                bytes(rec[:NONCE]), rec[NONCE:], aad(digest, i, i == count - 1),
                out_view[begin : begin + n],
            )
        except InvalidTag:
            raise fail(
                f"chunk {i} of {count} failed authentication (tampered, reordered, "
                "swapped, truncated or dropped data, or the wrong data key)"
            ) from None

    errors: dict[int, BaseException] = {}

    def run() -> None:
        while not failed.is_set():
            with take:
                i = next(pending, None)
            if i is None:
                return
            try:
                one(i)
            except BaseException as exc:
                errors[i] = exc
                failed.set()
                return

    workers = max(1, min(threads, count))
    if workers == 1:
        run()
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers - 1) as pool:  # this thread is one of the workers
            futures = [pool.submit(run) for _ in range(workers - 1)]
            run()
            for future in futures:
                future.result()  # waits for every thread
    if errors:
        # chunks are taken in order and a taken chunk is always tried, so the lowest
        # failed index is the first bad chunk whichever thread noticed first
        raise errors[min(errors)]
