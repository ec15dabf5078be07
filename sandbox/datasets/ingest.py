"""Read an owner's CSV or Parquet file and validate it against the declared schema.

:func:`iter_validated_batches` streams: it reads, converts and validates the file piece
by piece and yields record batches that conform exactly to
:meth:`DatasetSchema.arrow_schema`, so memory stays flat for files larger than RAM
(except 8 bytes per row for the privacy-unit check, see
:class:`~sandbox.datasets.checks.UnitCounter`).  It raises :class:`IngestError` at the
first problem, whose message names the GLOBAL data row (1-based, the header is not
counted) and the column, e.g. ``row 17, column "revenue": value 5000000000 is above the
upper bound 1000000000``.  Values of L4 (core) columns are never echoed.

Because problems can surface after some batches were yielded (a bad row late in the
file, or a privacy unit with too many rows, which is only known at the end), a
consumer must treat the batches as provisional until the iterator is exhausted:
:func:`sandbox.datasets.store.write_encrypted_parquet` writes to a temporary file and
discards it if the iterator raises.  :func:`read_validated` is the all-or-nothing
in-memory wrapper.

CSV conventions: UTF-8 without BOM, comma separated, one header line, LF or CRLF line
ends, no newlines inside quoted values; an empty unquoted field is null, a quoted
``""`` is the empty string; blank lines are skipped, except in a one-column file, where
an empty line is a null value.  All checks are vectorised with ``pyarrow.compute``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sandbox.datasets.checks import (
    IngestError,
    Piece,
    UnitCounter,
    check_column_set,
    fingerprints,
    q,
    validate_column,
    validate_columns,
)
from sandbox.datasets.csv_reader import CSV_BLOCK_BYTES, iter_csv_pieces
from sandbox.datasets.schema import ColumnSpec, ColumnType, DatasetSchema
from sandbox.datasets.spool import open_plaintext

__all__ = ["IngestError", "iter_validated_batches", "read_validated"]

_CSV_SUFFIXES = frozenset({".csv"})
_PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
#: Read buffer for Parquet column chunks (streamed, not pre-buffered per row group).
_PARQUET_BUFFER = 1 << 20

Progress = Callable[[int], None]


def read_validated(
    path: Path,
    schema: DatasetSchema,
    *,
    max_bytes: int | None = None,
    max_plaintext_bytes: int | None = None,
) -> pa.Table:
    """Read and validate the whole file into one table (all or nothing).

    Same checks and errors as :func:`iter_validated_batches`; returns a table with
    exactly ``schema.arrow_schema()``.  Holds the whole table in memory: prefer the
    iterator for large files.
    """
    batches = list(
        iter_validated_batches(
            path, schema, max_bytes=max_bytes, max_plaintext_bytes=max_plaintext_bytes
        )
    )
    return pa.Table.from_batches(batches, schema=schema.arrow_schema())


def iter_validated_batches(
    path: Path,
    schema: DatasetSchema,
    *,
    max_bytes: int | None = None,
    batch_rows: int = 262_144,
    max_plaintext_bytes: int | None = None,
    progress: Progress | None = None,
    csv_block_bytes: int = CSV_BLOCK_BYTES,
) -> Iterator[pa.RecordBatch]:
    """Stream ``path`` (``.csv``, ``.parquet`` or ``.pq``) as validated record batches.

    Every batch has exactly ``schema.arrow_schema()`` and at most ``batch_rows`` rows.
    Checks: file size against ``max_bytes`` (before reading), exact column set, types,
    nulls in non-nullable columns, finite floats, numeric bounds (reject or clamp per
    column), category value sets, ``max_rows`` (as rows stream) and
    ``privacy_unit.max_rows_per_unit`` (across the whole file, checked after the last
    batch: the final ``next()`` raises).  CSV: no BOM, no NUL bytes, no ragged rows.

    ``max_plaintext_bytes`` caps the decoded (Arrow) size of the data: a Parquet file
    whose footer declares more, or whose decoded batches add up to more while streaming,
    is rejected as a possible decompression bomb.  The cap is checked per batch, so one
    batch (``batch_rows`` rows) may briefly exceed it.

    ``progress``, if given, is called after each piece with the file bytes consumed so
    far (exact for CSV, estimated from rows for Parquet) and finally with the file size.
    ``csv_block_bytes`` is the CSV read unit (tests, tuning).

    Raises :class:`IngestError` on any problem, including unreadable or corrupt files.
    """
    if batch_rows < 1 or csv_block_bytes < 1:
        raise ValueError("batch_rows and csv_block_bytes must be positive")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CSV_SUFFIXES | _PARQUET_SUFFIXES:
        raise IngestError(
            f"unsupported file type {suffix!r} ({path.name}); use .csv, .parquet or .pq"
        )
    is_csv = suffix in _CSV_SUFFIXES
    fh = _open(path, max_bytes)
    with fh:
        size = fh.seek(0, os.SEEK_END)

        def pieces(columns: list[str] | None) -> Iterator[tuple[Piece, int]]:
            if is_csv:
                return iter_csv_pieces(fh, schema, block_bytes=csv_block_bytes, columns=columns)
            return _iter_parquet_pieces(fh, size, schema, batch_rows, max_plaintext_bytes, columns)

        arrow_schema = schema.arrow_schema()
        unit = schema.privacy_unit
        counter, id_index = None, -1
        if unit.id_column is not None:
            counter = UnitCounter(schema.column(unit.id_column), unit.max_rows_per_unit)
            id_index = [c.name for c in schema.columns].index(unit.id_column)
        rows = decoded = 0
        for piece, consumed in _guarded(pieces(None), path):
            if max_bytes is not None and consumed > max_bytes:  # the file grew meanwhile
                raise IngestError(f"the file is larger than the limit of {max_bytes} bytes")
            n = piece.num_rows
            if rows + n > schema.max_rows:
                raise IngestError(
                    f"the file has at least {rows + n} rows, more than the declared "
                    f"max_rows {schema.max_rows}"
                )
            decoded += piece.nbytes
            if max_plaintext_bytes is not None and decoded > max_plaintext_bytes:
                raise IngestError(
                    f"the decoded data exceeds the limit of {max_plaintext_bytes} bytes "
                    f"(after {rows + n} rows); a file this compressed may be a "
                    "decompression bomb"
                )
            columns = validate_columns(piece, schema, rows)
            if counter is not None:
                counter.add(columns[id_index])
            rows += n
            if progress is not None:
                progress(min(consumed, size))
            if isinstance(piece, pa.RecordBatch):
                yield pa.RecordBatch.from_arrays(columns, schema=arrow_schema)
            else:
                yield from pa.Table.from_arrays(columns, schema=arrow_schema).to_batches(
                    max_chunksize=batch_rows
                )
            del piece, columns
            # Hand freed parse buffers back to the OS before the next piece: mimalloc
            # otherwise keeps about one more piece's worth of memory (measured).
            pa.default_memory_pool().release_unused()
        if rows == 0:
            raise IngestError("the file contains no data rows")
        if counter is not None:
            over = counter.finish()
            if over is not None:
                offenders, largest = over
                again = _guarded(pieces([counter.spec.name]), path)
                row = _first_row_of(offenders, counter.spec, again)
                raise counter.error(row, largest)
        if progress is not None:
            progress(size)


def _open(path: Path, max_bytes: int | None) -> BinaryIO:
    """Open a regular file for reading, checking its size against ``max_bytes``. A file of
    an open encrypted upload spool is opened through its decrypting reader."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise IngestError(f"{path.name} is not a regular file")
        spooled = open_plaintext(path)
        fh = open(path, "rb") if spooled is None else spooled  # noqa: SIM115 - closed by caller
    except OSError as exc:
        raise IngestError(f"cannot read file {path.name}: {exc.strerror or exc}") from None
    size = fh.seek(0, os.SEEK_END)
    problem = None
    if spooled is None and not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        problem = f"{path.name} is not a regular file"
    elif max_bytes is not None and size > max_bytes:
        problem = f"the file is {size} bytes, larger than the limit of {max_bytes} bytes"
    if problem:
        fh.close()
        raise IngestError(problem)
    return fh


def _guarded(source: Iterator[tuple[Piece, int]], path: Path) -> Iterator[tuple[Piece, int]]:
    """Re-raise read errors (``OSError``) from ``source`` as :class:`IngestError`."""
    while True:
        try:
            item = next(source)
        except StopIteration:
            return
        except OSError as exc:
            raise IngestError(f"cannot read file {path.name}: {exc.strerror or exc}") from None
        yield item


def _first_row_of(
    offenders: np.ndarray, spec: ColumnSpec, pieces: Iterator[tuple[Piece, int]]
) -> int | None:
    """Second pass over the id column only: the 1-based row of the first row whose unit
    fingerprint is in ``offenders`` (sorted)."""
    rows = 0
    for piece, _ in pieces:
        col = validate_column(piece.column(spec.name), spec, rows)  # same clamping
        prints = fingerprints(col, spec)
        pos = np.minimum(np.searchsorted(offenders, prints), len(offenders) - 1)
        hits = np.flatnonzero(offenders[pos] == prints)
        if len(hits):
            return rows + int(hits[0]) + 1
        rows += piece.num_rows
    return None


# -- Parquet -----------------------------------------------------------------------------


def _iter_parquet_pieces(
    fh: BinaryIO,
    size: int,
    schema: DatasetSchema,
    batch_rows: int,
    max_plaintext_bytes: int | None,
    columns: list[str] | None,
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Yield ``(batch, estimated_bytes_consumed)`` with columns converted to the declared
    types.  Column chunks are streamed (no pre-buffering of whole row groups)."""
    fh.seek(0)
    try:
        pf = pq.ParquetFile(fh, pre_buffer=False, buffer_size=_PARQUET_BUFFER)
        file_schema = pf.schema_arrow
        meta = pf.metadata
    except (pa.ArrowException, OSError) as exc:
        raise IngestError(f"not a readable Parquet file: {_short(exc)}") from None
    check_column_set(list(file_schema.names), schema)
    specs = [schema.column(n) for n in columns] if columns else list(schema.columns)
    for spec in specs:
        _check_parquet_type(file_schema.field(spec.name).type, spec)
    if meta.num_rows > schema.max_rows:
        raise IngestError(
            f"the file has {meta.num_rows} rows, more than the declared max_rows {schema.max_rows}"
        )
    if max_plaintext_bytes is not None:
        declared = _declared_plaintext_bytes(meta, {s.name for s in specs})
        if declared > max_plaintext_bytes:
            raise IngestError(
                f"the file declares {declared} bytes of uncompressed data, more than the "
                f"limit of {max_plaintext_bytes} bytes (a possible decompression bomb)"
            )
    names = [s.name for s in specs]
    batches = pf.iter_batches(batch_size=batch_rows, columns=names, use_threads=True)
    rows = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except MemoryError:
            raise IngestError(
                f"ran out of memory decoding the Parquet file after row {rows} "
                "(a possible decompression bomb)"
            ) from None
        except (pa.ArrowException, OSError) as exc:
            raise IngestError(
                f"corrupt Parquet file: cannot decode the data after row {rows}: {_short(exc)}"
            ) from None
        arrays = [_coerce_parquet(batch.column(s.name), s, rows) for s in specs]
        rows += batch.num_rows
        yield pa.RecordBatch.from_arrays(arrays, names=names), size * rows // max(1, meta.num_rows)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


def _declared_plaintext_bytes(meta: pq.FileMetaData, names: set[str]) -> int:
    """Sum of the uncompressed sizes the footer declares for the selected columns."""
    total = 0
    for i in range(meta.num_row_groups):
        group = meta.row_group(i)
        for j in range(group.num_columns):
            chunk = group.column(j)
            if chunk.path_in_schema in names:
                total += max(0, chunk.total_uncompressed_size)
    return total


def _check_parquet_type(t: pa.DataType, spec: ColumnSpec) -> None:
    """Raise unless a Parquet column of type ``t`` converts losslessly to the declared type."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    stringish = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    ok = {
        ColumnType.INT: pa.types.is_integer(t),
        ColumnType.FLOAT: pa.types.is_floating(t)
        or pa.types.is_integer(t)
        or pa.types.is_decimal(t),
        ColumnType.STR: stringish,
        ColumnType.CATEGORY: stringish,
        ColumnType.BOOL: pa.types.is_boolean(t),
        ColumnType.DATE: pa.types.is_date(t),
    }[spec.type]
    if not ok:
        raise IngestError(
            f"column {q(spec.name)}: expected {spec.type.value}, found Parquet type {t}"
        )


def _coerce_parquet(col: pa.Array, spec: ColumnSpec, offset: int) -> pa.Array:
    """Losslessly cast a Parquet column to the declared Arrow type, or raise naming the
    first row that does not convert (e.g. a uint64 above the int64 range)."""
    if col.type == spec.arrow_type:
        return col
    try:
        return col.cast(spec.arrow_type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        reason = _short(exc)[:120]
    lo, hi = 0, len(col)  # invariant: col[:lo] converts, col[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            col.slice(lo, mid - lo).cast(spec.arrow_type, safe=True)
            lo = mid
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            hi = mid
    raise IngestError(
        f"row {offset + hi}, column {q(spec.name)}: cannot convert {col.type} "
        f"to {spec.type.value}: {reason}"
    )
