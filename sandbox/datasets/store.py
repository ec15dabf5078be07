"""The encrypted envelope: a dataset version as AES-256-GCM chunks of an Arrow IPC file.

File layout (all integers big-endian)::

    b"SBXENC1\\n"                       magic, 8 bytes
    header_len                          uint32
    header                              JSON, UTF-8, sorted keys: format, dataset_id,
                                        version, chunk_size, chunk_count,
                                        plaintext_bytes, payload, file_id
    chunk_count x [ nonce (12) | ciphertext (len_i) | tag (16) ]

Every chunk but the last holds ``chunk_size`` plaintext bytes.  The associated data of
chunk ``i`` is ``b"SBXENC1-chunk" | sha256(magic | header_len | header) | i | count``:
the header names the dataset id, version, sizes and a random per-file id, so a chunk
that is flipped, moved, swapped in from another file (even of the same dataset) or
dropped, and any edit of the header, fails authentication.  The file size must match
the header exactly, so truncation and appended data are detected before decryption.

Payload: an *uncompressed* Arrow IPC **file** (random-access format, with footer).
Ciphertext does not compress, and an uncompressed IPC file is loaded zero-copy
(``pa.ipc.open_file`` over the decrypted buffer) or, written as-is to a 0600 file in RAM,
memory-mapped by ``polars.scan_ipc`` (which needs the file format's footer; the stream
format would not do).  Loading therefore costs one AES-GCM pass (several GB/s) and no
decompression or copy, which is what the broker needs.  Disk use is higher than zstd
Parquet; that trade is deliberate.

Plaintext only ever exists in memory here; files are written 0600, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "CHUNK_SIZE",
    "IntegrityError",
    "StoredFileInfo",
    "decrypt_to_bytes",
    "encrypt_table",
    "load_table",
]

MAGIC = b"SBXENC1\n"
FORMAT_VERSION = 1
#: Plaintext bytes per chunk.
CHUNK_SIZE = 4 * 1024 * 1024
_MAX_CHUNK_SIZE = 64 * 1024 * 1024
_MAX_HEADER_BYTES = 64 * 1024
_NONCE = 12
_TAG = 16
_LEN = struct.Struct(">I")
_PAYLOAD = "arrow-ipc-file"
_HEADER_KEYS = frozenset(
    {
        "format",
        "dataset_id",
        "version",
        "chunk_size",
        "chunk_count",
        "plaintext_bytes",
        "payload",
        "file_id",
    }
)


class IntegrityError(Exception):
    """A stored file is not the expected, untampered dataset version.

    The message names the expected dataset id and version and the reason; it never
    contains plaintext.
    """


@dataclass(frozen=True)
class StoredFileInfo:
    """What :func:`encrypt_table` wrote: the path, the SHA-256 (hex) of the whole stored
    file, the plaintext (Arrow IPC file) length and the number of chunks."""

    path: Path
    ciphertext_sha256: str
    plaintext_bytes: int
    chunk_count: int


def _check_args(data_key: bytes, dataset_id: str, version: int) -> None:
    if len(data_key) != 32:
        raise ValueError(f"data key must be 32 bytes, got {len(data_key)}")
    if not isinstance(dataset_id, str) or not dataset_id:
        raise ValueError("dataset_id must be a non-empty string")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative int, got {version!r}")


def _chunk_count(plaintext_bytes: int, chunk_size: int) -> int:
    return max(1, -(-plaintext_bytes // chunk_size))


def _aad(header_digest: bytes, index: int, count: int) -> bytes:
    return b"SBXENC1-chunk" + header_digest + struct.pack(">QQ", index, count)


def _header_prefix(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return MAGIC + _LEN.pack(len(body)) + body


def encrypt_table(
    table: pa.Table,
    out_path: Path,
    data_key: bytes,
    *,
    dataset_id: str,
    version: int,
    chunk_size: int = CHUNK_SIZE,
) -> StoredFileInfo:
    """Serialise ``table`` as an uncompressed Arrow IPC file, encrypt it and write it.

    The file is written to a temporary file in ``out_path``'s directory (mode 0600),
    fsynced and moved into place with ``os.replace``; on any failure the temporary file
    is removed and ``out_path`` is untouched.  ``chunk_size`` is for tests; keep the
    default otherwise.
    """
    _check_args(data_key, dataset_id, version)
    if not 0 < chunk_size <= _MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in 1..{_MAX_CHUNK_SIZE}")
    out_path = Path(out_path)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    plaintext = memoryview(sink.getvalue()).cast("B")  # pyarrow exports format "b"
    size = plaintext.nbytes
    count = _chunk_count(size, chunk_size)
    prefix = _header_prefix(
        {
            "format": FORMAT_VERSION,
            "dataset_id": dataset_id,
            "version": version,
            "chunk_size": chunk_size,
            "chunk_count": count,
            "plaintext_bytes": size,
            "payload": _PAYLOAD,
            "file_id": secrets.token_hex(16),
        }
    )
    digest = hashlib.sha256(prefix).digest()
    aead = AESGCM(bytes(data_key))
    hasher = hashlib.sha256(prefix)
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(prefix)
            out = bytearray(_NONCE + min(chunk_size, size) + _TAG)
            out_view = memoryview(out)
            for i in range(count):
                piece = plaintext[i * chunk_size : (i + 1) * chunk_size]
                record = out_view[: _NONCE + len(piece) + _TAG]
                record[:_NONCE] = secrets.token_bytes(_NONCE)
                aead.encrypt_into(
                    bytes(record[:_NONCE]), piece, _aad(digest, i, count), record[_NONCE:]
                )
                hasher.update(record)
                fh.write(record)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(out_path.parent)
    return StoredFileInfo(
        path=out_path, ciphertext_sha256=hasher.hexdigest(), plaintext_bytes=size, chunk_count=count
    )


def _fsync_dir(directory: Path) -> None:
    """Best effort: make the rename durable."""
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _parse_header(raw: bytes, fail: Any) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise fail("header is not valid JSON") from None
    if not isinstance(header, dict) or set(header) != _HEADER_KEYS:
        raise fail("header has unexpected fields")
    ints = ("format", "version", "chunk_size", "chunk_count", "plaintext_bytes")
    if any(isinstance(header[k], bool) or not isinstance(header[k], int) for k in ints):
        raise fail("header field types are wrong")
    if header["format"] != FORMAT_VERSION or header["payload"] != _PAYLOAD:
        raise fail(f"unsupported format {header['format']!r}")
    if not 0 < header["chunk_size"] <= _MAX_CHUNK_SIZE or header["plaintext_bytes"] < 0:
        raise fail("header sizes are out of range")
    if header["chunk_count"] != _chunk_count(header["plaintext_bytes"], header["chunk_size"]):
        raise fail("header chunk count is inconsistent")
    return header


def decrypt_to_bytes(path: Path, data_key: bytes, *, dataset_id: str, version: int) -> bytearray:
    """Decrypt and authenticate a stored file into one preallocated ``bytearray``.

    Raises :class:`IntegrityError` (naming ``dataset_id`` and ``version``) on a bad magic,
    a header that does not name this dataset version, a truncated or extended file or
    any chunk failing authentication (which includes a wrong data key); on failure no
    partial plaintext is returned and the buffer is zeroed.  ``OSError`` propagates
    (e.g. a missing file).
    """
    _check_args(data_key, dataset_id, version)

    def fail(reason: str) -> IntegrityError:
        return IntegrityError(
            f"encrypted file for dataset {dataset_id!r} version {version} "
            f"failed the integrity check: {reason}"
        )

    with open(path, "rb") as fh:
        file_size = os.fstat(fh.fileno()).st_size
        start = fh.read(len(MAGIC) + _LEN.size)
        if len(start) < len(MAGIC) + _LEN.size or start[: len(MAGIC)] != MAGIC:
            raise fail("bad magic (not a sandbox encrypted file, or truncated)")
        (header_len,) = _LEN.unpack(start[len(MAGIC) :])
        if header_len > _MAX_HEADER_BYTES:
            raise fail("header is too large")
        raw_header = fh.read(header_len)
        if len(raw_header) != header_len:
            raise fail("file is truncated inside the header")
        header = _parse_header(raw_header, fail)
        if header["dataset_id"] != dataset_id or header["version"] != version:
            raise fail(
                f"file belongs to dataset {header['dataset_id']!r} version {header['version']!r}"
            )
        size, chunk_size, count = (
            header["plaintext_bytes"],
            header["chunk_size"],
            header["chunk_count"],
        )
        expected = len(start) + header_len + count * (_NONCE + _TAG) + size
        if file_size < expected:
            raise fail(f"file is truncated ({file_size} of {expected} bytes)")
        if file_size > expected:
            raise fail(f"file has {file_size - expected} unexpected trailing bytes")
        digest = hashlib.sha256(start + raw_header).digest()
        aead = AESGCM(bytes(data_key))
        out = bytearray(size)
        out_view = memoryview(out)
        record = bytearray(_NONCE + min(chunk_size, size) + _TAG)
        record_view = memoryview(record)
        try:
            for i in range(count):
                n = min(chunk_size, size - i * chunk_size)
                rec = record_view[: _NONCE + n + _TAG]
                if fh.readinto(rec) != len(rec):
                    raise fail(f"file is truncated in chunk {i} of {count}")
                try:
                    aead.decrypt_into(
                        bytes(rec[:_NONCE]),
                        rec[_NONCE:],
                        _aad(digest, i, count),
                        out_view[i * chunk_size : i * chunk_size + n],
                    )
                except InvalidTag:
                    raise fail(
                        f"chunk {i} of {count} failed authentication (tampered, reordered, "
                        "swapped or truncated data, or the wrong data key)"
                    ) from None
        except BaseException:
            out_view[:] = bytes(size)
            raise
    return out


def load_table(path: Path, data_key: bytes, *, dataset_id: str, version: int) -> pa.Table:
    """Decrypt a stored file and open it as an Arrow table (zero-copy over the buffer).

    Same errors as :func:`decrypt_to_bytes`; a payload that authenticates but is not a
    valid Arrow IPC file also raises :class:`IntegrityError`.
    """
    buf = decrypt_to_bytes(path, data_key, dataset_id=dataset_id, version=version)
    try:
        return pa.ipc.open_file(pa.py_buffer(buf)).read_all()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise IntegrityError(
            f"encrypted file for dataset {dataset_id!r} version {version} "
            "does not hold an Arrow IPC file"
        ) from None
