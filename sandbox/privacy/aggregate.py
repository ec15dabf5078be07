"""Exact, stable aggregation in the broker's own Polars: the input to every DP mechanism.

This is trusted code that turns rows into small vectors. Each *part* is one vector of
numbers (one entry per group, or per group and bin) with a stated per-row sensitivity:
how much adding or removing one row can change the vector in L1 (and, since a row lands
in exactly one entry, also in L2 and L-infinity):

- a count: 1;
- a clipped sum: ``max(|lower|, |upper|)`` of the owner's bounds, in fixed-point units;
- a histogram over public bin edges: 1 (a row falls in at most one bin).

Sums are computed exactly on integers: each clipped value is rounded to a grid of
``bound / 2**20`` and summed as int64 (overflow is ruled out from the public row bound),
so no floating-point rounding can depend on the data (see docs/explanation).
Quantile scores (``|#(x < c) - q n|`` per candidate ``c``) change by at most
``max(q, 1 - q)`` per row.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from sandbox.datasets.schema import ColumnSpec, ColumnType, DatasetSchema
from sandbox.errors import Invalid
from sandbox.privacy.spec import Aggregate, Filter, QuerySpec

MAX_GROUPS = 10_000
MAX_CELLS = 100_000
FIXED_POINT_STEPS = 2**20
QUANTILE_CANDIDATES = 256


class AggregationError(Invalid):
    """The query cannot be planned (public reasons only; HTTP 422)."""


@dataclass(frozen=True)
class Part:
    """One vector the mechanisms add noise to."""

    name: str
    kind: str  # "count", "sum", "histogram"
    sensitivity: float  # per row, in the part's own units
    scale_back: float = 1.0  # multiply the noisy vector by this to get released units
    column: str | None = None
    bins: tuple[float, ...] | None = None


def bounds(column: ColumnSpec) -> tuple[float, float]:
    if column.bounds is None:
        raise AggregationError(f"column {column.name!r} has no owner bounds")
    lo, hi = column.bounds
    return float(lo), float(hi)


def sum_part(name: str, column: ColumnSpec) -> Part:
    lo, hi = bounds(column)
    bound = max(abs(lo), abs(hi))
    if column.type == ColumnType.INT:
        return Part(name, "sum", bound, 1.0, column.name)
    step = bound / FIXED_POINT_STEPS if bound > 0 else 1.0
    return Part(name, "sum", float(FIXED_POINT_STEPS), step, column.name)


def filter_expr(flt: Filter) -> pl.Expr:
    col = pl.col(flt.column)
    values = flt.value if isinstance(flt.value, list) else [flt.value]
    match flt.op:
        case "==":
            return col.eq(flt.value)
        case "!=":
            return col.ne(flt.value)
        case "<":
            return col.lt(flt.value)
        case "<=":
            return col.le(flt.value)
        case ">":
            return col.gt(flt.value)
        case ">=":
            return col.ge(flt.value)
        case "in":
            return col.is_in(values)
        case "not_in":
            return ~col.is_in(values)
    raise AggregationError(f"unknown filter op {flt.op}")  # pragma: no cover


def filtered(lf: pl.LazyFrame, spec: QuerySpec) -> pl.LazyFrame:
    for flt in spec.filters:
        lf = lf.filter(filter_expr(flt))
    return lf


def public_keys(spec: QuerySpec, schema: DatasetSchema) -> pl.DataFrame:
    """Every combination of the owner's declared key values (the groups released)."""
    value_sets: list[list[Any]] = []
    for key in spec.group_by:
        column = schema.column(key)
        values: list[Any] = [True, False] if column.type == ColumnType.BOOL \
            else list(column.categories or [])
        if column.nullable:
            values.append(None)
        value_sets.append(values)
    combos = list(itertools.islice(itertools.product(*value_sets), MAX_GROUPS + 1))
    if len(combos) > MAX_GROUPS:
        raise AggregationError(f"group_by has more than {MAX_GROUPS} public key combinations")
    dtypes = {k: (pl.Boolean if schema.column(k).type == ColumnType.BOOL else pl.String)
              for k in spec.group_by}
    return pl.DataFrame({k: [c[j] for c in combos] for j, k in enumerate(spec.group_by)},
                        schema=dtypes)


def _value(column: ColumnSpec, part: Part) -> pl.Expr:
    lo, hi = bounds(column)
    expr = pl.col(column.name)
    if column.type == ColumnType.FLOAT:
        expr = expr.fill_nan(None)
    expr = expr.cast(pl.Float64).fill_null(lo).clip(lo, hi)
    if part.scale_back != 1.0:
        return (expr / part.scale_back).round(0).cast(pl.Int64)
    return expr.cast(pl.Int64)


def part_exprs(parts: list[Part], schema: DatasetSchema) -> list[pl.Expr]:
    exprs = []
    for part in parts:
        if part.kind == "count":
            exprs.append(pl.len().cast(pl.Int64).alias(part.name))
        elif part.kind == "sum":
            assert part.column is not None
            exprs.append(_value(schema.column(part.column), part).sum().alias(part.name))
    return exprs


def exact_parts(lf: pl.LazyFrame, spec: QuerySpec, schema: DatasetSchema, parts: list[Part],
                keys: pl.DataFrame | None) -> dict[str, np.ndarray]:
    """The exact vectors of every part, aligned with ``keys`` (and bins), as float64."""
    data = filtered(lf, spec)
    vectors: dict[str, np.ndarray] = {}
    linear = [p for p in parts if p.kind in ("count", "sum")]
    if linear:
        exprs = part_exprs(linear, schema)
        if spec.group_by and keys is not None:
            grouped = data.group_by(list(spec.group_by)).agg(exprs).collect()
            joined = keys.join(grouped, on=list(spec.group_by), how="left", nulls_equal=True)
            for part in linear:
                vectors[part.name] = joined[part.name].fill_null(0).to_numpy().astype(np.float64)
        else:
            row = data.select(exprs).collect()
            for part in linear:
                vectors[part.name] = row[part.name].fill_null(0).to_numpy().astype(np.float64)
    for part in parts:
        if part.kind == "histogram":
            vectors[part.name] = _histogram(data, spec, keys, part)
    return vectors


def _histogram(data: pl.LazyFrame, spec: QuerySpec, keys: pl.DataFrame | None,
               part: Part) -> np.ndarray:
    assert part.bins is not None and part.column is not None
    edges = list(part.bins)
    n_bins = len(edges) - 1
    value = pl.col(part.column).cast(pl.Float64)
    inside = data.filter(value.is_between(edges[0], edges[-1], closed="both"))
    # bin i holds [edge_i, edge_{i+1}); the last bin also holds its upper edge
    codes = pl.lit(0, dtype=pl.Int64)
    for edge in edges[1:-1]:
        codes = codes + (value >= edge).cast(pl.Int64)
    binned = inside.with_columns(codes.alias("__bin"))
    group = [*spec.group_by, "__bin"]
    counts = binned.group_by(group).agg(pl.len().cast(pl.Int64).alias("n")).collect()
    bin_frame = pl.DataFrame({"__bin": list(range(n_bins))}, schema={"__bin": pl.Int64})
    grid = keys.join(bin_frame, how="cross") if keys is not None and spec.group_by \
        else bin_frame
    joined = grid.join(counts, on=group, how="left", nulls_equal=True)
    return joined["n"].fill_null(0).to_numpy().astype(np.float64)


def quantile_candidates(column: ColumnSpec) -> np.ndarray:
    lo, hi = bounds(column)
    if column.type == ColumnType.INT:
        span = int(hi) - int(lo)
        if span + 1 <= QUANTILE_CANDIDATES:
            return np.arange(int(lo), int(hi) + 1, dtype=np.float64)
    return np.linspace(lo, hi, QUANTILE_CANDIDATES)


def quantile_scores(lf: pl.LazyFrame, spec: QuerySpec, schema: DatasetSchema, agg: Aggregate,
                    keys: pl.DataFrame | None, candidates: np.ndarray) -> np.ndarray:
    """``|#(x < c) - q n|`` for each candidate, per group: shape (groups, candidates).

    Candidates are evenly spaced, so one pass suffices: each value's bin is
    ``floor((x - c_0) / step)`` and ``#(x < c_i)`` is the count of bins below ``i``.
    """
    assert agg.column is not None
    q = 0.5 if agg.kind == "median" else float(agg.q or 0.5)
    column = schema.column(agg.column)
    lo, hi = bounds(column)
    m = len(candidates)
    step = float(candidates[1] - candidates[0]) if m > 1 else 1.0
    value = pl.col(agg.column).cast(pl.Float64)
    if column.type == ColumnType.FLOAT:
        value = value.fill_nan(None)
    value = value.fill_null(lo).clip(lo, hi)
    bin_index = ((value - float(candidates[0])) / step).floor().clip(0, m).cast(pl.Int64)
    data = filtered(lf, spec).select(*spec.group_by, bin_index.alias("__bin"))
    group = [*spec.group_by, "__bin"]
    counts = data.group_by(group).agg(pl.len().cast(pl.Int64).alias("__c")).collect()
    n_groups = keys.height if spec.group_by and keys is not None else 1
    matrix = np.zeros((n_groups, m + 1), dtype=np.float64)
    if spec.group_by and keys is not None:
        index = keys.with_row_index("__g")
        counts = counts.join(index, on=list(spec.group_by), how="inner", nulls_equal=True)
        rows = counts["__g"].to_numpy()
    else:
        rows = np.zeros(counts.height, dtype=np.int64)
    np.add.at(matrix, (rows, counts["__bin"].to_numpy()), counts["__c"].to_numpy())
    n = matrix.sum(axis=1)
    less = np.cumsum(matrix, axis=1)[:, :m] - matrix[:, :m]  # counts of bins below i
    return np.abs(less - q * n[:, None])


def observed_key_counts(lf: pl.LazyFrame, spec: QuerySpec) -> dict[str, float]:
    """Row counts per observed key combination (for DP key release), keys JSON-encoded."""
    counts = (filtered(lf, spec).group_by(list(spec.group_by))
              .agg(pl.len().alias("__n")).collect())
    # every observed key goes to the threshold mechanism: truncating to the largest would
    # let one row swap two keys, beyond the stability the mechanism is told
    names = list(spec.group_by)
    return {json.dumps([row[k] for k in names], default=str): float(row["__n"])
            for row in counts.iter_rows(named=True)}


def decode_key(encoded: str, spec: QuerySpec) -> dict[str, Any]:
    return dict(zip(spec.group_by, json.loads(encoded), strict=True))
