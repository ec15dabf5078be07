"""Mock data generated from a dataset's PUBLIC schema alone, for analysts to develop on.

:func:`generate_mock` never looks at real rows: every value comes from the declared
types, bounds, category sets and nullability and a seeded random generator, so a mock
table discloses nothing beyond the schema.  It is shaped so code written against it
runs on the real data: same Arrow schema, values within bounds, every group present.

Guarantees (checked by property tests):

* the result has exactly ``schema.arrow_schema()`` and passes
  :func:`sandbox.datasets.ingest.read_validated` when written as Parquet (and as CSV,
  unless a category value contains a line break), including ``max_rows`` and
  ``privacy_unit.max_rows_per_unit``;
* it is deterministic in ``(schema, n_rows, seed)``;
* nullable columns get some nulls when there are at least two rows free to hold them;
  non-nullable columns never do;
* every combination of the key columns (:meth:`DatasetSchema.key_columns`, minus the
  privacy-unit id column, whose values are governed by ``max_rows_per_unit``) appears
  in at least one row.  The row count grows from ``n_rows`` to cover them when there
  are at most :data:`MAX_COMBINATIONS` combinations (or at most ``n_rows``).  Beyond
  that cap, each key column's values are covered individually instead (every value
  appears, not every combination).

The row count never exceeds ``max(n_rows, MAX_COMBINATIONS)``, ``max_rows``, or what
the id column can hold (e.g. a bounded int id allows ``(upper - lower + 1) *
max_rows_per_unit`` rows); when that is too small, coverage degrades the same way, to
each column's values and then to as many values as fit.  :func:`plan_mock` says which
case applies.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from sandbox.datasets.schema import ColumnSpec, ColumnType, DatasetSchema

__all__ = [
    "MAX_COMBINATIONS",
    "MockPlan",
    "generate_mock",
    "mock_csv_bytes",
    "mock_parquet_bytes",
    "plan_mock",
]

#: Most key combinations a mock table is grown to cover.
MAX_COMBINATIONS = 100_000
_NULL_SHARE = 0.1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_DATE_FROM, _DATE_TO = 10_957, 20_453  # 2000-01-01 .. 2025-12-31 (days since 1970)
_MAX_DATE_ID = 2_932_896  # distinct days from 1970-01-01 to 9999-12-31
_STR_CARDINALITY = 100

Coverage = Literal["combinations", "columns", "partial"]


@dataclass(frozen=True)
class MockPlan:
    """How :func:`generate_mock` will shape a table: its row count, the key columns
    covered and how: ``"combinations"`` (every combination appears), ``"columns"``
    (every value of each key column appears) or ``"partial"`` (as many values as fit)."""

    n_rows: int
    key_columns: tuple[str, ...]
    coverage: Coverage


def _key_values(spec: ColumnSpec) -> list[str] | list[bool]:
    return list(spec.categories or []) if spec.type is ColumnType.CATEGORY else [False, True]


def _int_bounds(spec: ColumnSpec) -> tuple[int, int] | None:
    if spec.bounds is None:
        return None
    lo, hi = (min(max(int(b), _INT64_MIN), _INT64_MAX) for b in spec.bounds)
    return lo, hi


def _float_order(x: float) -> int:
    """Monotonic map of doubles to ints; ``-0.0`` and ``0.0`` both map to 0."""
    bits = int(np.array(x, dtype=np.float64).view(np.int64))
    return bits if bits >= 0 else -(bits & _INT64_MAX)


def _float_from_order(order: np.ndarray) -> np.ndarray:
    bits = np.where(order >= 0, order, (-order) | np.int64(_INT64_MIN))
    return bits.astype(np.int64).view(np.float64)


def _id_capacity(spec: ColumnSpec) -> int | None:
    """How many distinct values the id column can take (None: practically unlimited)."""
    if spec.type is ColumnType.INT:
        bounds = _int_bounds(spec)
        return None if bounds is None else bounds[1] - bounds[0] + 1
    if spec.type is ColumnType.FLOAT:
        if spec.bounds is None:
            return None
        return _float_order(spec.bounds[1]) - _float_order(spec.bounds[0]) + 1
    if spec.type is ColumnType.DATE:
        return _MAX_DATE_ID
    if spec.type in (ColumnType.BOOL, ColumnType.CATEGORY):
        return len(_key_values(spec))
    return None


def _keys(schema: DatasetSchema) -> list[ColumnSpec]:
    unit = schema.privacy_unit.id_column
    return [schema.column(n) for n in schema.key_columns() if n != unit]


def plan_mock(schema: DatasetSchema, n_rows: int = 1000) -> MockPlan:
    """The row count and key coverage :func:`generate_mock` will produce (see module doc)."""
    if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 1:
        raise ValueError(f"n_rows must be a positive int, got {n_rows!r}")
    cap = schema.max_rows
    unit = schema.privacy_unit
    if unit.id_column is not None:
        ids = _id_capacity(schema.column(unit.id_column))
        if ids is not None:
            cap = min(cap, ids * unit.max_rows_per_unit)
    limit = min(cap, max(n_rows, MAX_COMBINATIONS))
    keys = _keys(schema)
    names = tuple(k.name for k in keys)
    sizes = [len(_key_values(k)) for k in keys]
    combos = 1
    for size in sizes:
        combos = min(combos * size, limit + 1)
    widest = max(sizes, default=1)
    if combos <= limit:
        return MockPlan(min(max(n_rows, combos), cap), names, "combinations")
    if widest <= limit:
        return MockPlan(min(max(n_rows, widest), cap), names, "columns")
    return MockPlan(limit, names, "partial")


def _rng(seed: int, name: str) -> np.random.Generator:
    """Per-column stream: a column's values do not depend on the other columns."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def generate_mock(schema: DatasetSchema, n_rows: int = 1000, seed: int = 0) -> pa.Table:
    """A synthetic table for ``schema`` (see the module docstring for the guarantees).

    Values: ints and floats uniform within bounds (unbounded L4 numbers: small
    synthetic values), categories and bools uniform, dates in 2000-2025, strings
    ``mock_<column>_<n>``; the privacy-unit id column gets at most
    ``max_rows_per_unit`` rows per value.  ``seed`` must be a non-negative int.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    plan = plan_mock(schema, n_rows)
    n = plan.n_rows
    key_codes = _key_codes(schema, plan, seed)
    unit = schema.privacy_unit
    arrays = []
    for spec in schema.columns:
        rng = _rng(seed, spec.name)
        if spec.name == unit.id_column:
            arrays.append(_id_values(spec, n, unit.max_rows_per_unit, rng))
        elif spec.name in key_codes:
            codes, free = key_codes[spec.name]
            mask = _nulls(rng, free) if spec.nullable else None
            arrays.append(_from_codes(spec, codes, mask))
        else:
            mask = _nulls(rng, np.ones(n, dtype=bool)) if spec.nullable else None
            arrays.append(_random_values(spec, n, rng, mask))
    return pa.Table.from_arrays(arrays, schema=schema.arrow_schema())


def _key_codes(
    schema: DatasetSchema, plan: MockPlan, seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per key column: value codes per row and a mask of rows free to be null (rows
    not needed for coverage)."""
    n = plan.n_rows
    keys = _keys(schema)
    sizes = [len(_key_values(k)) for k in keys]
    rng = _rng(seed, "\x00keys")
    order = rng.permutation(n)  # spread the covering rows over the table
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    combos = math.prod(sizes) if plan.coverage == "combinations" else 0
    stride = 1
    for spec, size in zip(keys, sizes, strict=True):
        if plan.coverage == "combinations":
            codes = rng.integers(0, size, n)
            codes[:combos] = (np.arange(combos) // stride) % size
            free = np.arange(n) >= combos
            stride *= size
        else:
            codes = rng.permutation(np.arange(n) % size)  # every value once per `size` rows
            free = _not_first_occurrence(codes)
        out[spec.name] = (codes[order], free[order])
    return out


def _not_first_occurrence(codes: np.ndarray) -> np.ndarray:
    """True for rows whose code already appeared in an earlier row."""
    free = np.ones(len(codes), dtype=bool)
    _, first = np.unique(codes, return_index=True)
    free[first] = False
    return free


def _nulls(rng: np.random.Generator, free: np.ndarray) -> np.ndarray | None:
    """A null mask: about 10% of the free rows, at least one if two or more are free."""
    candidates = np.flatnonzero(free)
    mask = np.zeros(len(free), dtype=bool)
    if len(candidates) < 2:
        return mask
    mask[candidates[rng.random(len(candidates)) < _NULL_SHARE]] = True
    if not mask.any():
        mask[candidates[rng.integers(len(candidates))]] = True
    return mask


def _from_codes(spec: ColumnSpec, codes: np.ndarray, mask: np.ndarray | None) -> pa.Array:
    if spec.type is ColumnType.BOOL:
        return pa.array(codes.astype(bool), pa.bool_(), mask=mask)
    indices = pa.array(codes.astype(np.int32), pa.int32(), mask=mask)
    dictionary = pa.array(spec.categories or [], pa.string())
    return pa.DictionaryArray.from_arrays(indices, dictionary).cast(pa.string())


def _id_values(spec: ColumnSpec, n: int, per_unit: int, rng: np.random.Generator) -> pa.Array:
    """Values for the privacy-unit id column: each value on at most ``per_unit`` rows."""
    units = rng.permutation(n) // per_unit
    if spec.type is ColumnType.STR:
        count = int(units.max()) + 1
        names = pa.array([f"mock_{spec.name}_{u}" for u in range(count)], pa.string())
        return pa.DictionaryArray.from_arrays(pa.array(units, pa.int64()), names).cast(pa.string())
    if spec.type is ColumnType.INT:
        bounds = _int_bounds(spec)
        base = 1 if bounds is None else bounds[0]
        return pa.array(units.astype(np.int64) + np.int64(base), pa.int64())
    if spec.type is ColumnType.FLOAT:
        if spec.bounds is None:
            return pa.array(units.astype(np.float64), pa.float64())
        order = units.astype(np.int64) + np.int64(_float_order(spec.bounds[0]))
        return pa.array(_float_from_order(order), pa.float64())
    if spec.type is ColumnType.DATE:
        return pa.array(units.astype(np.int32), pa.int32()).cast(pa.date32())
    return _from_codes(spec, units, None)


def _random_values(
    spec: ColumnSpec, n: int, rng: np.random.Generator, mask: np.ndarray | None
) -> pa.Array:
    """Independent random values for a column that is neither a key nor the id."""
    kind = spec.type
    if kind is ColumnType.INT:
        low, high = _int_bounds(spec) or (0, 1_000_000)
        return pa.array(rng.integers(low, high, n, dtype=np.int64, endpoint=True), mask=mask)
    if kind is ColumnType.FLOAT:
        if spec.bounds is None:
            values = np.round(rng.normal(0.0, 1000.0, n), 2)
        else:
            lo, hi = float(spec.bounds[0]), float(spec.bounds[1])
            u = rng.random(n)
            values = u * hi + (1.0 - u) * lo  # no overflow even for huge bounds
            if hi - lo >= 1.0:
                values = np.round(values, 2)
            values = np.clip(values, lo, hi)
        return pa.array(values, pa.float64(), mask=mask)
    if kind is ColumnType.STR:
        count = min(n, _STR_CARDINALITY)
        names = pa.array([f"mock_{spec.name}_{i}" for i in range(count)], pa.string())
        codes = pa.array(rng.integers(0, count, n), pa.int64(), mask=mask)
        return pa.DictionaryArray.from_arrays(codes, names).cast(pa.string())
    if kind is ColumnType.DATE:
        days = rng.integers(_DATE_FROM, _DATE_TO, n, endpoint=True).astype(np.int32)
        return pa.array(days, pa.int32(), mask=mask).cast(pa.date32())
    size = len(_key_values(spec))
    return _from_codes(spec, rng.integers(0, size, n), mask)


def mock_csv_bytes(table: pa.Table) -> bytes:
    """The table as UTF-8 CSV in the ingest conventions: a header line, null as an empty
    unquoted field, strings quoted (so ``""`` is the empty string), ISO dates."""
    sink = pa.BufferOutputStream()
    pcsv.write_csv(table, sink, write_options=pcsv.WriteOptions(quoting_style="needed"))
    return bytes(sink.getvalue().to_pybytes())


def mock_parquet_bytes(table: pa.Table) -> bytes:
    """The table as a zstd-compressed Parquet file."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return bytes(sink.getvalue().to_pybytes())
