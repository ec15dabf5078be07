"""The DP engine: builds the Polars plan and the OpenDP measurement from a validated spec.

Only this module turns rows into numbers. It never accepts code or serialized plans: the
plan is built here from a ``QuerySpec`` that ``validate.check_query`` has accepted.

Speed without weakening the guarantee: OpenDP's documented ``Context.query().release()``
binary-searches the noise scale (about 4 s a query). The privacy loss of a Laplace
measurement is inversely proportional to its scale, so the engine measures the loss at
scale 1, solves for the scale in closed form, and lets OpenDP's own ``check`` confirm the
measurement fits the budget (nudging the scale up in the rare case rounding says no).
The data reaches OpenDP as ``scan_parquet`` over a 0600 file in RAM, which OpenDP scans
lazily (building a Context over an in-memory frame costs seconds).
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, cast

import opendp.prelude as dp
import polars as pl
from opendp.domains import _lazyframe_from_domain

from sandbox.datasets.schema import ColumnSpec, ColumnType, DatasetSchema
from sandbox.privacy.spec import Aggregate, Filter, QuerySpec

dp.enable_features("contrib")

ALPHA = 0.05  # intervals are 95%
MAX_GROUPS = 10_000

_ATOM = {
    ColumnType.INT: dp.i64,
    ColumnType.FLOAT: dp.f64,
    ColumnType.STR: dp.String,
    ColumnType.CATEGORY: dp.String,
    ColumnType.BOOL: bool,
}


class EngineError(RuntimeError):
    """The engine could not build or run a measurement (treated as generic by callers)."""


@dataclass(frozen=True)
class OutputColumn:
    name: str
    kind: str  # "key", "count", "sum", "mean"
    parts: tuple[str, ...] = ()  # hidden plan columns it is computed from


@dataclass(frozen=True)
class PreparedQuery:
    """A measurement ready to run, and everything needed to report its accuracy."""

    spec: QuerySpec
    measurement: Any
    columns: tuple[str, ...]
    outputs: tuple[OutputColumn, ...]
    accuracy: dict[str, float] = field(default_factory=dict)  # hidden column -> half-width
    epsilon: float = 0.0


def prepare(spec: QuerySpec, schema: DatasetSchema) -> PreparedQuery:
    """Build and check the measurement for ``spec``; touches no data."""
    columns = _needed_columns(spec) or _placeholder_column(schema)
    domain = dp.lazyframe_domain([_series_domain(schema.column(c)) for c in columns])
    domain = dp.with_margin(domain, dp.polars.Margin(by=[], max_length=schema.max_rows))
    plan, outputs, alphas = _plan(spec, schema, _lazyframe_from_domain(domain))
    d_in = schema.privacy_unit.max_rows_per_unit
    measurement = _calibrate(domain, plan, d_in, spec.epsilon)
    accuracy = _accuracy(measurement, alphas)
    return PreparedQuery(spec=spec, measurement=measurement, columns=tuple(columns),
                         outputs=tuple(outputs), accuracy=accuracy,
                         epsilon=float(measurement.map(d_in)))


def execute(prepared: PreparedQuery, parquet_path: Path) -> dict[str, Any]:
    """Run the measurement over the Parquet dataset at ``parquet_path``; the released table."""
    data = pl.scan_parquet(parquet_path).select(list(prepared.columns))
    try:
        frame = prepared.measurement(data).collect()
    except Exception as exc:  # data-dependent: callers turn it into one generic error
        raise EngineError("the measurement failed") from exc
    return _release_table(prepared, frame)


def _needed_columns(spec: QuerySpec) -> list[str]:
    names = list(spec.group_by)
    names += [f.column for f in spec.filters]
    names += [a.column for a in spec.aggregates if a.column]
    return list(dict.fromkeys(names))


def _placeholder_column(schema: DatasetSchema) -> list[str]:
    """A query touching no column (a bare count) still needs one to count the rows of."""
    for column in schema.columns:
        if column.classification.value != "L4" and column.type != ColumnType.DATE:
            return [column.name]
    raise EngineError("the dataset has no queryable column")


def _series_domain(column: ColumnSpec) -> Any:
    if column.type == ColumnType.DATE:
        raise EngineError(f"column {column.name!r}: date columns are not queryable yet")
    atom = dp.atom_domain(T=_ATOM[column.type], nan=True) if column.type == ColumnType.FLOAT \
        else dp.atom_domain(T=_ATOM[column.type])
    if column.nullable:
        atom = dp.option_domain(atom)
    return dp.series_domain(column.name, atom)


def _bounds(column: ColumnSpec) -> tuple[Any, Any]:
    assert column.bounds is not None
    lo, hi = column.bounds
    if column.type == ColumnType.INT:
        return math.ceil(lo), math.floor(hi)
    return float(lo), float(hi)


def _value_expr(column: ColumnSpec) -> pl.Expr:
    lo, _ = _bounds(column)
    expr = pl.col(column.name)
    if column.type == ColumnType.FLOAT:
        expr = expr.fill_nan(lo)
    return expr.fill_null(lo)


def _filter_expr(flt: Filter) -> pl.Expr:
    col = pl.col(flt.column)
    value = flt.value
    match flt.op:
        case "==":
            return col.eq(value)
        case "!=":
            return col.ne(value)
        case "<":
            return col.lt(value)
        case "<=":
            return col.le(value)
        case ">":
            return col.gt(value)
        case ">=":
            return col.ge(value)
        case "in":  # OpenDP 0.16 does not support is_in: a chain of equalities
            equal = [col.eq(v) for v in _as_list(value)]
            return functools.reduce(operator.or_, equal)
        case "not_in":
            differ = [col.ne(v) for v in _as_list(value)]
            return functools.reduce(operator.and_, differ)
    raise EngineError(f"unknown filter op {flt.op}")  # pragma: no cover


def _noisy_len() -> pl.Expr:
    """A Laplace-noised row count (OpenDP's ``.dp`` namespace is untyped)."""
    expr: pl.Expr = cast(Any, pl.len()).dp.noise()
    return expr


def _noisy_sum(expr: pl.Expr, bounds: tuple[Any, Any]) -> pl.Expr:
    """A Laplace-noised sum, each value clipped to the owner's ``bounds``."""
    noisy: pl.Expr = cast(Any, expr).dp.sum(bounds)
    return noisy


def _as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else [value]


def _plan(spec: QuerySpec, schema: DatasetSchema,
          base: pl.LazyFrame) -> tuple[pl.LazyFrame, list[OutputColumn], dict[str, float]]:
    """The Polars plan of noisy expressions, the output columns and each part's alpha."""
    exprs: list[pl.Expr] = []
    outputs = [OutputColumn(k, "key") for k in spec.group_by]
    alphas: dict[str, float] = {}
    for i, agg in enumerate(spec.aggregates):
        exprs_i, out, part_alphas = _aggregate_exprs(agg, schema, i)
        exprs += exprs_i
        outputs.append(out)
        alphas.update(part_alphas)
    lf = base
    for flt in spec.filters:
        lf = lf.filter(_filter_expr(flt))
    if spec.group_by:
        keys = _key_frame(spec, schema)
        plan = keys.join(lf.group_by(list(spec.group_by)).agg(exprs), how="left",
                         on=list(spec.group_by), nulls_equal=True)
    else:
        plan = lf.select(exprs)
    return plan, outputs, alphas


def _aggregate_exprs(agg: Aggregate, schema: DatasetSchema,
                     i: int) -> tuple[list[pl.Expr], OutputColumn, dict[str, float]]:
    if agg.kind == "count":
        part = f"__p{i}_len"
        return [_noisy_len().alias(part)], OutputColumn(agg.name, "count", (part,)), \
            {part: ALPHA}
    assert agg.column is not None
    column = schema.column(agg.column)
    value = _noisy_sum(_value_expr(column), _bounds(column))
    if agg.kind == "sum":
        part = f"__p{i}_sum"
        return [value.alias(part)], OutputColumn(agg.name, "sum", (part,)), {part: ALPHA}
    # mean = noisy sum / noisy count, each at alpha/2 so the pair covers jointly at 1-alpha
    s, n = f"__p{i}_sum", f"__p{i}_len"
    return ([value.alias(s), _noisy_len().alias(n)],
            OutputColumn(agg.name, "mean", (s, n)), {s: ALPHA / 2, n: ALPHA / 2})


def _key_frame(spec: QuerySpec, schema: DatasetSchema) -> pl.LazyFrame:
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
        raise EngineError(f"group_by has more than {MAX_GROUPS} public key combinations")
    data = {key: [c[j] for c in combos] for j, key in enumerate(spec.group_by)}
    schema_pl = {k: (pl.Boolean if schema.column(k).type == ColumnType.BOOL else pl.String)
                 for k in spec.group_by}
    return pl.LazyFrame(data, schema=schema_pl)


def _calibrate(domain: Any, plan: pl.LazyFrame, d_in: int, epsilon: float) -> Any:
    """The measurement with the smallest scale OpenDP accepts for ``epsilon`` (closed form)."""
    metric = dp.symmetric_distance()

    def make(scale: float) -> Any:
        return dp.m.make_private_lazyframe(domain, metric, dp.max_divergence(), plan,
                                           global_scale=scale)

    loss_at_one = float(make(1.0).map(d_in))
    scale = loss_at_one / epsilon
    for attempt in range(30):
        measurement = make(scale)
        if measurement.check(d_in, epsilon):
            return measurement
        scale *= 1 + 1e-12 * 10**attempt
    raise EngineError("could not calibrate the noise scale")  # pragma: no cover


def _accuracy(measurement: Any, alphas: dict[str, float]) -> dict[str, float]:
    """Half-width of each hidden column's interval at the alpha assigned to it."""
    result: dict[str, float] = {}
    for alpha in sorted(set(alphas.values())):
        summary = dp.summarize_polars_measurement(measurement, alpha)
        for row in summary.iter_rows(named=True):
            name = row["column"]
            if alphas.get(name) == alpha:
                result[name] = float(row["accuracy"])
    missing = set(alphas) - set(result)
    if missing:
        raise EngineError(f"no accuracy for {sorted(missing)}")  # pragma: no cover
    return result


def interval(prepared: PreparedQuery, out: OutputColumn,
             values: dict[str, float | None]) -> tuple[float | None, float | None, float | None]:
    """(value, low, high) of one output cell from its hidden noisy parts."""
    if out.kind in ("count", "sum"):
        v = values[out.parts[0]]
        if v is None:
            return None, None, None
        a = prepared.accuracy[out.parts[0]]
        return float(v), float(v) - a, float(v) + a
    s, n = values[out.parts[0]], values[out.parts[1]]
    if s is None or n is None:
        return None, None, None
    a_s, a_n = prepared.accuracy[out.parts[0]], prepared.accuracy[out.parts[1]]
    value = s / n if n > 0 else None
    if n - a_n <= 0:
        return value, None, None  # too few rows for a bounded interval
    corners = [(s + ds) / (n + dn) for ds in (-a_s, a_s) for dn in (-a_n, a_n)]
    return value, min(corners), max(corners)


def _release_table(prepared: PreparedQuery, frame: pl.DataFrame) -> dict[str, Any]:
    rows = []
    for record in frame.iter_rows(named=True):
        row: dict[str, Any] = {}
        for out in prepared.outputs:
            if out.kind == "key":
                value = record[out.name]
                row[out.name] = value.isoformat() if isinstance(value, date) else value
            else:
                v, lo, hi = interval(prepared, out, {p: record[p] for p in out.parts})
                row[out.name] = {"value": v, "low": lo, "high": hi}
        rows.append(row)
    key_names = [o.name for o in prepared.outputs if o.kind == "key"]
    rows.sort(key=lambda r: tuple("" if r[k] is None else str(r[k]) for k in key_names))
    return {
        "columns": [{"name": o.name, "kind": o.kind} for o in prepared.outputs],
        "rows": rows,
        "epsilon": prepared.epsilon,
        "confidence": 1 - ALPHA,
        "mechanism": "laplace",
    }


def estimate(prepared: PreparedQuery) -> dict[str, Any]:
    """Dry run: cost and the half-width of each aggregate's interval, without data."""
    per_output: dict[str, float | None] = {}
    for out in prepared.outputs:
        if out.kind in ("count", "sum"):
            per_output[out.name] = prepared.accuracy[out.parts[0]]
        elif out.kind == "mean":
            per_output[out.name] = None  # depends on the noisy count; reported as interval
    return {"epsilon": prepared.epsilon, "confidence": 1 - ALPHA, "half_width": per_output}
