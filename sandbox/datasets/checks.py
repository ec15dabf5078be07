"""Validation shared by the streaming readers: per-column checks and rows per privacy unit.

Everything here works on one *piece* of a file at a time (a ``pa.Table`` or
``pa.RecordBatch``) and is given the piece's ``offset``: the number of data rows before
it in the file, so every message names the GLOBAL 1-based data row (the header is not
counted).  Messages name the column and say what was expected and what was found;
values of L4 (core) columns are never echoed.

:class:`UnitCounter` checks ``privacy_unit.max_rows_per_unit`` across pieces with
bounded memory: it keeps one 64-bit fingerprint per row (see its docstring for the cost
and the collision argument).
"""

from __future__ import annotations

import json
from typing import Any, TypeAlias

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from sandbox.datasets.schema import ColumnSpec, ColumnType, DatasetSchema

__all__ = ["IngestError", "UnitCounter", "check_column_set", "validate_columns"]

Column: TypeAlias = pa.Array | pa.ChunkedArray
Piece: TypeAlias = pa.Table | pa.RecordBatch

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
#: Fixed seeds for polars' string hash: fingerprints must agree across pieces and passes.
_HASH_SEEDS = (0x5B0C_1E57, 0x1D5E_ED01, 0x0DA7_A5E7, 0x7A11_CE55)
#: Rows compared per step in :meth:`UnitCounter.finish` (bounds its temporary memory).
_SCAN_STEP = 1 << 20


class IngestError(ValueError):
    """The input file does not conform to the schema; the message names row and column."""


def q(name: str) -> str:
    """Quote a column name for messages (escapes control and bidi characters)."""
    return json.dumps(name)


def num(value: float) -> str:
    """Format a number compactly: ints as-is, floats with up to 12 significant digits."""
    return str(value) if isinstance(value, int) else f"{value:.12g}"


def show(value: Any, spec: ColumnSpec) -> str:
    """Render a data value for an error message; L4 values are hidden."""
    if not spec.queryable:
        return "(value hidden: L4 column)"
    if isinstance(value, float):
        return num(value)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_column_set(actual: list[str], schema: DatasetSchema) -> None:
    """Raise :class:`IngestError` unless ``actual`` is exactly the declared column set
    (any order), naming duplicate, missing and unexpected columns."""
    declared = [c.name for c in schema.columns]
    problems = []
    dups = sorted({n for n in actual if actual.count(n) > 1})
    if dups:
        problems.append("duplicate columns: " + ", ".join(map(q, dups)))
    missing = [n for n in declared if n not in actual]
    if missing:
        problems.append("missing columns: " + ", ".join(map(q, missing)))
    unexpected = [n for n in actual if n not in declared]
    if unexpected:
        problems.append("unexpected columns: " + ", ".join(map(q, unexpected[:20])))
    if problems:
        raise IngestError("; ".join(problems))


def _first(mask: Column) -> int:
    """Index of the first true value in a boolean mask (nulls count as false), or -1."""
    return int(pc.index(pc.fill_null(mask, False), True).as_py())


def validate_columns(piece: Piece, schema: DatasetSchema, offset: int) -> list[Column]:
    """Validate every declared column of ``piece``; return them in declared order.

    ``piece`` must already hold the declared Arrow types (the readers convert).  Checks:
    nulls in non-nullable columns, finite floats, bounds (reject, or clamp per column)
    and category value sets.  Row numbers in errors are ``offset + index + 1``.
    """
    return [validate_column(piece.column(spec.name), spec, offset) for spec in schema.columns]


def validate_column(col: Column, spec: ColumnSpec, offset: int) -> Column:
    """Check one column of a piece (see :func:`validate_columns`); may return a clamped copy."""
    where = f"column {q(spec.name)}"
    if col.null_count and not spec.nullable:
        row = offset + _first(pc.is_null(col)) + 1
        raise IngestError(f"row {row}, {where}: missing value (null) in a non-nullable column")
    if spec.type is ColumnType.FLOAT and col.null_count < len(col):
        bad = _first(pc.invert(pc.is_finite(col)))
        if bad >= 0:
            raise IngestError(
                f"row {offset + bad + 1}, {where}: value {show(col[bad].as_py(), spec)} "
                "is not a finite number"
            )
    if spec.bounds is not None and col.null_count < len(col):
        col = _check_bounds(col, spec, offset)
    if spec.type is ColumnType.CATEGORY:
        value_set = pa.array(spec.categories or [], pa.string())
        bad = _first(pc.and_(pc.invert(pc.is_in(col, value_set=value_set)), pc.is_valid(col)))
        if bad >= 0:
            shown = ", ".join(map(repr, (spec.categories or [])[:10]))
            more = ", ..." if len(spec.categories or []) > 10 else ""
            raise IngestError(
                f"row {offset + bad + 1}, {where}: unknown category "
                f"{show(col[bad].as_py(), spec)}; declared categories: [{shown}{more}]"
            )
    return col


def _check_bounds(col: Column, spec: ColumnSpec, offset: int) -> Column:
    assert spec.bounds is not None
    lo_f, hi_f = spec.bounds
    lo: Any = float(lo_f)
    hi: Any = float(hi_f)
    if spec.type is ColumnType.INT:  # int bounds beyond int64 cannot bind an int64 column
        lo = min(max(int(lo_f), _INT64_MIN), _INT64_MAX)
        hi = min(max(int(hi_f), _INT64_MIN), _INT64_MAX)
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
        f"row {offset + idx + 1}, column {q(spec.name)}: value {show(value, spec)} "
        f"is {side} bound {num(bound)}"
    )


def fingerprints(col: Column, spec: ColumnSpec) -> np.ndarray:
    """One ``uint64`` per value of a (validated, null-free) privacy-unit id column.

    Equal values always give equal fingerprints.  int, date and bool values map
    injectively (their bits), floats too after folding ``-0.0`` into ``0.0``; strings
    and categories use polars' 64-bit string hash with fixed seeds.
    """
    if spec.type in (ColumnType.STR, ColumnType.CATEGORY):
        series = pl.from_arrow(col)
        assert isinstance(series, pl.Series)
        return series.hash(*_HASH_SEEDS).to_numpy().astype(np.uint64, copy=False)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if spec.type is ColumnType.DATE:
        col = col.cast(pa.int32())
    values = col.to_numpy(zero_copy_only=False)
    if spec.type is ColumnType.FLOAT:
        return (values.astype(np.float64) + 0.0).view(np.uint64)
    return values.astype(np.int64).view(np.uint64)


class UnitCounter:
    """Counts rows per privacy unit across pieces, for ``max_rows_per_unit``.

    Memory: exactly 8 bytes per row (one ``uint64`` fingerprint, see
    :func:`fingerprints`), kept until :meth:`finish`, which assembles them into one array
    and sorts it in place (plus a temporary of about 1 MiB).  10 million rows cost 80 MB.

    Exactness: int, float, date and bool ids are fingerprinted injectively, so the
    check is exact.  String ids use a 64-bit hash: two *different* ids collide with
    probability about ``n**2 / 2**65`` for ``n`` rows (3e-6 for 10 million rows,
    3e-4 for 100 million).  A collision can only make two units look like one, i.e.
    cause a spurious rejection; it can never let an over-contributing unit through,
    because equal ids always hash equally.
    """

    def __init__(self, spec: ColumnSpec, max_rows_per_unit: int) -> None:
        self.spec = spec
        self.limit = max_rows_per_unit
        self._chunks: list[np.ndarray] = []
        self._rows = 0

    def add(self, col: Column) -> None:
        """Record the ids of the next piece (rows in file order)."""
        if len(col):
            self._chunks.append(fingerprints(col, self.spec))
            self._rows += len(col)

    def finish(self) -> tuple[np.ndarray, int] | None:
        """Return ``None`` if every unit has at most ``max_rows_per_unit`` rows, else the
        sorted unique fingerprints of the offending units and the largest row count of one
        unit.  Frees the stored fingerprints."""
        ids = np.empty(self._rows, dtype=np.uint64)
        pos = 0
        while self._chunks:
            chunk = self._chunks.pop(0)
            ids[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        ids.sort()
        m = self.limit
        offenders: list[np.ndarray] = []
        for start in range(0, max(0, len(ids) - m), _SCAN_STEP):
            stop = min(start + _SCAN_STEP, len(ids) - m)
            same = ids[start + m : stop + m] == ids[start:stop]
            if same.any():
                offenders.append(np.unique(ids[start:stop][same]))
        if not offenders:
            return None
        bad = np.unique(np.concatenate(offenders))
        counts = np.searchsorted(ids, bad, "right") - np.searchsorted(ids, bad, "left")
        return bad, int(counts.max())

    def error(self, row: int | None, largest: int) -> IngestError:
        """The rejection message: names the id column and a row, never an id value."""
        where = f"row {row}, " if row is not None else ""
        return IngestError(
            f"{where}column {q(self.spec.name)}: a privacy unit has up to {largest} rows, "
            f"more than max_rows_per_unit = {self.limit}"
        )
