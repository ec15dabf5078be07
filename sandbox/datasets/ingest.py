"""Read an owner's CSV or Parquet file and validate it against the declared schema.

:func:`read_validated` is all-or-nothing: it either returns a table that conforms
exactly to :meth:`DatasetSchema.arrow_schema` or raises :class:`IngestError` whose
message names the first bad row (1-based data row, the header is not counted) and the
column, e.g. ``row 17, column "revenue": value 5000000000 is above the upper bound
1000000000``.  Values of L4 (core) columns are never echoed in messages.

CSV conventions: UTF-8 without BOM, comma separated, one header line, no newlines
inside quoted values; an empty unquoted field is null, a quoted ``""`` is the empty
string.  All checks are vectorised with ``pyarrow.compute``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from sandbox.datasets.schema import ColumnSpec, ColumnType, DatasetSchema

__all__ = ["IngestError", "read_validated"]

_BOM = b"\xef\xbb\xbf"
_CSV_SUFFIXES = frozenset({".csv"})
_PARQUET_SUFFIXES = frozenset({".parquet", ".pq"})
_CONVERSION_RE = re.compile(
    r"In CSV column #(\d+): CSV conversion error to ([^:]+): invalid value '(.*)'\s*$", re.S
)


class IngestError(ValueError):
    """The input file does not conform to the schema; the message names row and column."""


def _q(name: str) -> str:
    """Quote a column name for messages (escapes control and bidi characters)."""
    return json.dumps(name)


def _num(value: float) -> str:
    """Format a number compactly: ints as-is, floats with up to 12 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.12g}"


def _show(value: Any, spec: ColumnSpec) -> str:
    """Render a data value for an error message; L4 values are hidden."""
    if not spec.queryable:
        return "(value hidden: L4 column)"
    if isinstance(value, float):
        return _num(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_validated(path: Path, schema: DatasetSchema, *, max_bytes: int | None = None) -> pa.Table:
    """Read ``path`` (``.csv``, ``.parquet`` or ``.pq``) and validate it against ``schema``.

    Checks: size (``max_bytes``, before parsing), exact column set, types, nulls in
    non-nullable columns, finite floats, numeric bounds (reject or clamp per column),
    category value sets, ``max_rows`` and ``privacy_unit.max_rows_per_unit``; the CSV
    must not contain a BOM or NUL bytes and must not have ragged rows.

    Returns a table with exactly ``schema.arrow_schema()`` (declared column order).
    Raises :class:`IngestError` on any problem; nothing is returned half-validated.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _CSV_SUFFIXES | _PARQUET_SUFFIXES:
        raise IngestError(
            f"unsupported file type {suffix!r} ({path.name}); use .csv, .parquet or .pq"
        )
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise IngestError(f"{path.name} is not a regular file")
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if max_bytes is not None and size > max_bytes:
                raise IngestError(
                    f"the file is {size} bytes, larger than the limit of {max_bytes} bytes"
                )
            if suffix in _CSV_SUFFIXES:
                data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
                if max_bytes is not None and len(data) > max_bytes:
                    raise IngestError(f"the file is larger than the limit of {max_bytes} bytes")
                table = _read_csv(data, schema)
            else:
                table = _read_parquet(fh, schema)
    except OSError as exc:
        raise IngestError(f"cannot read file {path.name}: {exc.strerror or exc}") from None
    return _validate(table, schema)


# -- CSV -------------------------------------------------------------------------------


def _csv_convert_options(schema: DatasetSchema) -> pcsv.ConvertOptions:
    """Declared types; only an empty unquoted field is null (``""`` is the empty string)."""
    return pcsv.ConvertOptions(
        column_types={c.name: c.arrow_type for c in schema.columns},
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=False,
    )


def _read_csv(data: bytes, schema: DatasetSchema) -> pa.Table:
    if data.startswith(_BOM):
        raise IngestError(
            "the file starts with a UTF-8 byte order mark (BOM); save it as UTF-8 without BOM"
        )
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise IngestError(
            f"NUL byte at line {line} (byte offset {nul}); this is not a UTF-8 text CSV"
        )
    header = _csv_header(data)
    _check_column_set(header, schema)
    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(use_threads=True),
            convert_options=_csv_convert_options(schema),
        )
    except pa.ArrowInvalid as exc:
        raise _explain_csv_error(str(exc), data, schema, header) from None
    if table.column_names != header:
        raise IngestError(
            "CSV header could not be read consistently; check quoting of the header line"
        )
    return table


def _csv_header(data: bytes) -> list[str]:
    end = data.find(b"\n")
    first = (data if end < 0 else data[:end]).rstrip(b"\r")
    if not first.strip():
        raise IngestError("the first line must be the header with the column names")
    try:
        text = first.decode("utf-8")
    except UnicodeDecodeError:
        raise IngestError("the header line is not valid UTF-8") from None
    return next(csv.reader([text]))


def _explain_csv_error(
    msg: str, data: bytes, schema: DatasetSchema, header: list[str]
) -> IngestError:
    """Turn a pyarrow CSV error into an IngestError naming row and column where possible."""
    if "CSV parse error" in msg:
        first: list[Any] = []

        def handler(row: Any) -> str:
            first.append(row)
            return "error"

        # Single-threaded re-parse: pyarrow then reports the line number.
        with contextlib.suppress(pa.ArrowInvalid):
            pcsv.read_csv(
                pa.BufferReader(data),
                read_options=pcsv.ReadOptions(use_threads=False),
                parse_options=pcsv.ParseOptions(invalid_row_handler=handler),
                convert_options=pcsv.ConvertOptions(
                    column_types=dict.fromkeys(header, pa.string())
                ),
            )
        if first and first[0].number is not None:
            row = first[0]
            return IngestError(
                f"row {row.number - 1} (line {row.number}): expected {row.expected_columns} "
                f"columns, got {row.actual_columns}"
            )
        return IngestError(f"malformed CSV: {msg.split(':', 2)[-1].strip()[:120]}")
    match = _CONVERSION_RE.match(msg)
    if match and int(match.group(1)) < len(header):
        name, value = header[int(match.group(1))], match.group(3)
        spec = schema.column(name)
        col = pcsv.read_csv(
            pa.BufferReader(data),
            convert_options=pcsv.ConvertOptions(
                include_columns=[name],
                column_types={name: pa.string()},
                strings_can_be_null=True,
                null_values=[""],
                quoted_strings_can_be_null=False,
            ),
        ).column(0)
        index = pc.index(col, value).as_py()
        where = f"row {index + 1}, column {_q(name)}" if index >= 0 else f"column {_q(name)}"
        return IngestError(f"{where}: cannot parse {_show(value, spec)} as {spec.type.value}")
    col_match = re.match(r"In CSV column #(\d+): (.*)", msg, re.S)
    if col_match and int(col_match.group(1)) < len(header):
        name = header[int(col_match.group(1))]
        return IngestError(f"column {_q(name)}: {col_match.group(2)[:160]}")
    return IngestError(f"cannot read CSV: {msg[:160]}")


# -- Parquet -----------------------------------------------------------------------------


def _read_parquet(fh: BinaryIO, schema: DatasetSchema) -> pa.Table:
    try:
        pf = pq.ParquetFile(fh)
        _check_column_set(list(pf.schema_arrow.names), schema)
        table = pf.read(columns=[c.name for c in schema.columns], use_threads=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise IngestError(f"not a readable Parquet file: {str(exc)[:160]}") from None
    columns = [_coerce_parquet(table.column(c.name), c) for c in schema.columns]
    return pa.Table.from_arrays(columns, names=[c.name for c in schema.columns])


def _coerce_parquet(col: pa.ChunkedArray, spec: ColumnSpec) -> pa.ChunkedArray:
    """Losslessly cast a Parquet column to the declared Arrow type, or raise."""
    t = col.type
    stringish = pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)
    if pa.types.is_dictionary(t):
        vt = t.value_type
        stringish = pa.types.is_string(vt) or pa.types.is_large_string(vt)
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
            f"column {_q(spec.name)}: expected {spec.type.value}, found Parquet type {t}"
        )
    if t == spec.arrow_type:
        return col
    try:
        return col.cast(spec.arrow_type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise IngestError(
            f"column {_q(spec.name)}: cannot convert {t} to {spec.type.value}: {str(exc)[:120]}"
        ) from None


# -- shared checks ------------------------------------------------------------------------


def _check_column_set(actual: list[str], schema: DatasetSchema) -> None:
    declared = [c.name for c in schema.columns]
    problems = []
    dups = sorted({n for n in actual if actual.count(n) > 1})
    if dups:
        problems.append("duplicate columns: " + ", ".join(map(_q, dups)))
    missing = [n for n in declared if n not in actual]
    if missing:
        problems.append("missing columns: " + ", ".join(map(_q, missing)))
    unexpected = [n for n in actual if n not in declared]
    if unexpected:
        problems.append("unexpected columns: " + ", ".join(map(_q, unexpected[:20])))
    if problems:
        raise IngestError("; ".join(problems))


def _first(mask: pa.ChunkedArray | pa.Array) -> int:
    """Index of the first true value in a boolean mask (nulls count as false), or -1."""
    return int(pc.index(pc.fill_null(mask, False), True).as_py())


def _validate(table: pa.Table, schema: DatasetSchema) -> pa.Table:
    n = table.num_rows
    if n == 0:
        raise IngestError("the file contains no data rows")
    if n > schema.max_rows:
        raise IngestError(
            f"the file has {n} rows, more than the declared max_rows {schema.max_rows}"
        )
    columns = [_validate_column(table.column(spec.name), spec) for spec in schema.columns]
    result = pa.Table.from_arrays(columns, schema=schema.arrow_schema())
    _check_privacy_unit(result, schema)
    return result


def _validate_column(col: pa.ChunkedArray, spec: ColumnSpec) -> pa.ChunkedArray:
    where = f"column {_q(spec.name)}"
    if col.null_count and not spec.nullable:
        row = _first(pc.is_null(col)) + 1
        raise IngestError(f"row {row}, {where}: missing value (null) in a non-nullable column")
    if spec.type is ColumnType.FLOAT and col.null_count < len(col):
        bad = _first(pc.invert(pc.is_finite(col)))
        if bad >= 0:
            raise IngestError(
                f"row {bad + 1}, {where}: value {_show(col[bad].as_py(), spec)} "
                "is not a finite number"
            )
    if spec.bounds is not None and col.null_count < len(col):
        col = _check_bounds(col, spec)
    if spec.type is ColumnType.CATEGORY:
        value_set = pa.array(spec.categories or [], pa.string())
        bad = _first(pc.and_(pc.invert(pc.is_in(col, value_set=value_set)), pc.is_valid(col)))
        if bad >= 0:
            shown = ", ".join(map(repr, (spec.categories or [])[:10]))
            more = ", ..." if len(spec.categories or []) > 10 else ""
            raise IngestError(
                f"row {bad + 1}, {where}: unknown category {_show(col[bad].as_py(), spec)}; "
                f"declared categories: [{shown}{more}]"
            )
    return col


def _check_bounds(col: pa.ChunkedArray, spec: ColumnSpec) -> pa.ChunkedArray:
    assert spec.bounds is not None
    lo_f, hi_f = spec.bounds
    lo: Any = int(lo_f) if spec.type is ColumnType.INT else float(lo_f)
    hi: Any = int(hi_f) if spec.type is ColumnType.INT else float(hi_f)
    lo_s, hi_s = pa.scalar(lo, col.type), pa.scalar(hi, col.type)
    extremes = pc.min_max(col)
    if extremes["min"].as_py() >= lo and extremes["max"].as_py() <= hi:
        return col
    if spec.on_out_of_bounds == "clamp":
        clipped = pc.min_element_wise(col, hi_s, skip_nulls=False)
        return pc.max_element_wise(clipped, lo_s, skip_nulls=False)
    below, above = _first(pc.less(col, lo_s)), _first(pc.greater(col, hi_s))
    idx = min(i for i in (below, above) if i >= 0)
    value = col[idx].as_py()
    side, bound = ("below the lower", lo) if idx == below else ("above the upper", hi)
    raise IngestError(
        f"row {idx + 1}, column {_q(spec.name)}: value {_show(value, spec)} "
        f"is {side} bound {_num(bound)}"
    )


def _check_privacy_unit(table: pa.Table, schema: DatasetSchema) -> None:
    unit = schema.privacy_unit
    if unit.id_column is None:
        return
    col = table.column(unit.id_column)
    counts = pc.value_counts(col)
    tally = counts.field("counts")
    if pc.max(tally).as_py() <= unit.max_rows_per_unit:
        return
    over = pc.greater(tally, unit.max_rows_per_unit)
    offenders = pc.filter(counts.field("values"), over)
    row = _first(pc.is_in(col, value_set=offenders))
    count = int(pc.max(pc.filter(tally, over)).as_py())
    raise IngestError(
        f"row {row + 1}, column {_q(unit.id_column)}: a privacy unit has up to {count} rows, "
        f"more than max_rows_per_unit = {unit.max_rows_per_unit}"
    )
