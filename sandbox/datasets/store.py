"""Dataset versions at rest: a zstd Parquet file, encrypted as it is written.

:func:`write_encrypted_parquet` streams record batches through a Parquet writer whose
output is sealed chunk by chunk (format 2, see :mod:`sandbox.datasets.envelope`: the
STREAM online-AE construction over AES-256-GCM, binding dataset id, version, file id,
chunk index and a final-chunk flag).  :func:`open_envelope` checks a stored file and
:meth:`Envelope.decrypt_into` authenticates it into any writable buffer (the worker's
RAM buffers, :mod:`sandbox.datasets.plaintext`); :func:`decrypt_to_bytes` does so into a
new ``bytearray``; :func:`load_table` reads it into Arrow.

Plaintext only ever exists in memory: records are encrypted as the Parquet writer emits
bytes and appended to a 0600 temporary file in the target directory, which is fsynced
and renamed into place only when the whole payload has been written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandbox.datasets.envelope import (
    CHUNK_SIZE,
    FORMAT_VERSION,
    LEN,
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_HEADER_BYTES,
    PAYLOAD,
    EncryptingSink,
    Fail,
    IntegrityError,
    decrypt_records,
    header_prefix,
    layout,
    parse_header,
)
from sandbox.datasets.mapped import MAPS

__all__ = [
    "CHUNK_SIZE",
    "DECRYPT_THREADS",
    "FORMAT_VERSION",
    "Envelope",
    "IntegrityError",
    "StoredFileInfo",
    "decrypt_to_bytes",
    "encrypt_table",
    "load_table",
    "open_envelope",
    "write_encrypted_parquet",
]

#: Rows per Parquet row group (large groups scan fast; memory is about one group).
ROW_GROUP_ROWS = 1_048_576
#: Threads that decrypt chunks in parallel (the AEAD releases the GIL).
DECRYPT_THREADS = max(1, min(8, len(os.sched_getaffinity(0))))


@dataclass(frozen=True)
class StoredFileInfo:
    """What :func:`write_encrypted_parquet` wrote: the path, the SHA-256 (hex) of the
    whole stored file, the plaintext (Parquet file) length, the number of chunks and
    the number of data rows."""

    path: Path
    ciphertext_sha256: str
    plaintext_bytes: int
    chunk_count: int
    row_count: int


def _check_args(data_key: bytes, dataset_id: str, version: int) -> None:
    if len(data_key) != 32:
        raise ValueError(f"data key must be 32 bytes, got {len(data_key)}")
    if not isinstance(dataset_id, str) or not dataset_id:
        raise ValueError("dataset_id must be a non-empty string")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be a non-negative int, got {version!r}")


def write_encrypted_parquet(
    batches: Iterable[pa.RecordBatch],
    arrow_schema: pa.Schema,
    out_path: Path,
    data_key: bytes,
    *,
    dataset_id: str,
    version: int,
    row_group_rows: int = ROW_GROUP_ROWS,
    chunk_size: int = CHUNK_SIZE,
) -> StoredFileInfo:
    """Write ``batches`` as one zstd Parquet file, encrypted as it streams, to ``out_path``.

    Batches must match ``arrow_schema``; they are regrouped into row groups of
    ``row_group_rows`` rows (the last may be smaller), so memory is about one row group
    plus one chunk whatever the number of rows.  The file is written to a 0600 temporary
    file in ``out_path``'s directory, fsynced, moved into place with ``os.replace`` and
    the directory fsynced.  On ANY exception, including one raised by the ``batches``
    iterator (e.g. an ``IngestError`` found late in the input), the temporary file is
    removed, ``out_path`` is untouched and the exception propagates.  ``chunk_size`` is
    for tests; keep the default otherwise.
    """
    _check_args(data_key, dataset_id, version)
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_SIZE}")
    if row_group_rows < 1:
        raise ValueError("row_group_rows must be positive")
    out_path = Path(out_path)
    prefix = header_prefix(
        {
            "format": FORMAT_VERSION,
            "dataset_id": dataset_id,
            "version": version,
            "chunk_size": chunk_size,
            "payload": PAYLOAD,
            "file_id": secrets.token_hex(16),
        }
    )
    fd, tmp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    sink: EncryptingSink | None = None
    try:
        with os.fdopen(fd, "wb") as raw:
            os.fchmod(raw.fileno(), 0o600)  # mkstemp's mode already; made explicit
            sink = EncryptingSink(raw, prefix, data_key, chunk_size)
            rows = _write_parquet(batches, arrow_schema, sink, row_group_rows)
            sink.finish()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        if sink is not None:
            sink.aborted = True
            sink.wipe()
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(out_path.parent)
    assert sink.hasher is not None  # made with checksum=True
    return StoredFileInfo(
        path=out_path,
        ciphertext_sha256=sink.hasher.hexdigest(),
        plaintext_bytes=sink.position,
        chunk_count=sink.chunks,
        row_count=rows,
    )


def _write_parquet(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema, sink: EncryptingSink, group: int
) -> int:
    """Regroup ``batches`` into row groups of ``group`` rows and write them to ``sink``."""
    writer = pq.ParquetWriter(sink, schema, compression="zstd")
    pending: list[pa.RecordBatch] = []
    pending_rows = rows = 0
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            pending.append(batch)
            pending_rows += batch.num_rows
            while pending_rows >= group:
                table = pa.Table.from_batches(pending, schema=schema)
                writer.write_table(table.slice(0, group), row_group_size=group)
                rest = table.slice(group)
                pending, pending_rows = rest.to_batches(), rest.num_rows
                rows += group
                del table, rest
                pa.default_memory_pool().release_unused()  # keep the peak at ~1 row group
        if pending_rows or rows == 0:
            table = pa.Table.from_batches(pending, schema=schema)
            writer.write_table(table, row_group_size=group)
            rows += pending_rows
    except BaseException:
        sink.aborted = True
        with contextlib.suppress(Exception):
            writer.close()
        raise
    writer.close()
    return rows


def encrypt_table(
    table: pa.Table,
    out_path: Path,
    data_key: bytes,
    *,
    dataset_id: str,
    version: int,
    chunk_size: int = CHUNK_SIZE,
    row_group_rows: int = ROW_GROUP_ROWS,
) -> StoredFileInfo:
    """Encrypt an in-memory table: :func:`write_encrypted_parquet` over its batches."""
    _check_args(data_key, dataset_id, version)
    return write_encrypted_parquet(
        table.to_batches(),
        table.schema,
        out_path,
        data_key,
        dataset_id=dataset_id,
        version=version,
        row_group_rows=row_group_rows,
        chunk_size=chunk_size,
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


@dataclass(frozen=True)
class Envelope:
    """An opened stored file whose header, dataset version and length were checked:
    ``size`` is the plaintext (Parquet file) length. Nothing is decrypted yet."""

    body: memoryview
    aead: AESGCM
    digest: bytes
    count: int
    size: int
    chunk_size: int
    fail: Fail

    def decrypt_into(self, out: Any) -> None:
        """Authenticate and decrypt every chunk into ``out``, a writable buffer of exactly
        ``size`` bytes. Raises :class:`IntegrityError` if any chunk fails; then ``out``
        has been zeroed, so no unauthenticated or partial plaintext is left in it."""
        if memoryview(out).nbytes != self.size:
            raise ValueError(f"output buffer must be {self.size} bytes")
        try:
            decrypt_records(self.body, self.aead, self.digest, out, self.count,
                            self.chunk_size, self.fail, threads=DECRYPT_THREADS)
        except BaseException:
            np.frombuffer(out, dtype=np.uint8).fill(0)
            raise


@contextlib.contextmanager
def open_envelope(path: Path, data_key: bytes, *, dataset_id: str,
                  version: int) -> Iterator[Envelope]:
    """Map a stored file read-only and check it before any decryption: the magic, the
    header (fields, types, format, payload, chunk size), that it names ``dataset_id`` and
    ``version``, and that its length is full chunks plus one final chunk. Raises
    :class:`IntegrityError` on any of these; ``OSError`` propagates (a missing file).
    The file is read through a map kept for reuse (:mod:`sandbox.datasets.mapped`), so
    loading it again costs no new page-table updates."""
    _check_args(data_key, dataset_id, version)
    fail = Fail(dataset_id, version)
    if os.stat(path).st_size < len(MAGIC) + LEN.size:
        raise fail("bad magic (not a format-2 sandbox encrypted file, or truncated)")
    with contextlib.ExitStack() as mapped:
        try:
            view = mapped.enter_context(MAPS.open(path))
        except ValueError:  # emptied since the stat: nothing to map
            raise fail("bad magic (not a format-2 sandbox encrypted file, or truncated)") \
                from None
        start = bytes(view[: len(MAGIC) + LEN.size])
        if start[: len(MAGIC)] != MAGIC:
            raise fail("bad magic (not a format-2 sandbox encrypted file, or truncated)")
        (header_len,) = LEN.unpack(start[len(MAGIC) :])
        if header_len > MAX_HEADER_BYTES:
            raise fail("header is too large")
        raw_header = bytes(view[len(start) : len(start) + header_len])
        if len(raw_header) != header_len:
            raise fail("file is truncated inside the header")
        header = parse_header(raw_header, fail)
        if header["dataset_id"] != dataset_id or header["version"] != version:
            raise fail(
                f"file belongs to dataset {header['dataset_id']!r} version {header['version']!r}"
            )
        body = view[len(start) + header_len :]
        count, size = layout(len(body), header["chunk_size"], fail)
        digest = hashlib.sha256(start + raw_header).digest()
        try:
            yield Envelope(body, AESGCM(bytes(data_key)), digest, count, size,
                           header["chunk_size"], fail)
        finally:
            with contextlib.suppress(BufferError):
                body.release()


def decrypt_to_bytes(path: Path, data_key: bytes, *, dataset_id: str, version: int) -> bytearray:
    """Decrypt and authenticate a stored file into one preallocated ``bytearray`` holding
    the Parquet file.

    Raises :class:`IntegrityError` (naming ``dataset_id`` and ``version``, never
    plaintext) on a bad magic, a header that does not name this dataset version, a length
    that cannot be full chunks plus one final chunk, or any chunk failing authentication
    (tampered, reordered, swapped, truncated or dropped chunks, or the wrong data key);
    on failure the buffer is zeroed and not returned.  ``OSError`` propagates (e.g. a
    missing file).  The worker decrypts into its RAM buffers instead
    (:func:`open_envelope`, :meth:`Envelope.decrypt_into`), with the same contract.
    """
    with open_envelope(path, data_key, dataset_id=dataset_id, version=version) as envelope:
        out = bytearray(envelope.size)
        envelope.decrypt_into(out)
    return out


def load_table(path: Path, data_key: bytes, *, dataset_id: str, version: int) -> pa.Table:
    """Decrypt a stored file and read its Parquet payload into an Arrow table.

    Same errors as :func:`decrypt_to_bytes`; a payload that authenticates but is not a
    readable Parquet file also raises :class:`IntegrityError`.  The decrypted buffer is
    zeroed once the table is read (the table does not reference it).
    """
    buf = decrypt_to_bytes(path, data_key, dataset_id=dataset_id, version=version)
    try:
        return pq.read_table(pa.BufferReader(pa.py_buffer(buf)))
    except (pa.ArrowException, OSError):
        raise _not_parquet(dataset_id, version) from None
    finally:
        np.frombuffer(buf, dtype=np.uint8).fill(0)


def _not_parquet(dataset_id: str, version: int) -> IntegrityError:
    return IntegrityError(
        f"encrypted file for dataset {dataset_id!r} version {version} "
        "does not hold a readable Parquet file"
    )
