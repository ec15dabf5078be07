"""The DP engine: plans a validated spec, runs it through the broker's OpenDP session.

``plan`` is data-independent: from the spec and the schema it fixes the columns read, the
public keys, the parts that get noise, how the cost is split between mechanisms, and so
the accuracy of every released value (``estimate``) before any row is touched.
``execute`` runs the plan's measurements through an OpenDP session over the dataset
handle (``sandbox.privacy.mechanisms``) and formats the released table: every value with
its 95% interval, and the cost.

The Polars work is the broker's own (``sandbox.privacy.aggregate``), so a DP query costs
about what the plain Polars query costs; OpenDP adds the noise and does the accounting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from sandbox.datasets.schema import DatasetSchema
from sandbox.privacy import aggregate as agg
from sandbox.privacy import mechanisms as mech
from sandbox.privacy.spec import Aggregate, QuerySpec
from sandbox.privacy.units import Cost

ALPHA = 0.05  # intervals are 95%


class EngineError(RuntimeError):
    """A measurement failed while running (callers treat it as data-dependent)."""


@dataclass(frozen=True)
class Output:
    name: str
    kind: str  # key, count, sum, mean, quantile, median, histogram
    parts: tuple[str, ...] = ()
    aggregate: Aggregate | None = None


@dataclass
class Plan:
    """Everything decided before data: see the module docstring."""

    spec: QuerySpec
    schema: DatasetSchema
    cost: Cost
    columns: list[str]
    keys: pl.DataFrame | None
    parts: list[agg.Part]
    outputs: list[Output]
    quantiles: list[Aggregate]
    d_in: int
    share: float  # each mechanism's share of the cost, in the cost's unit
    threshold_epsilon: float = 0.0
    alphas: dict[str, float] = field(default_factory=dict)
    min_group_size: int = 10

    @property
    def unit(self) -> str:
        return self.cost.unit


def plan(spec: QuerySpec, schema: DatasetSchema, *, min_group_size: int = 10) -> Plan:
    """``min_group_size`` is the floor of the DP-key threshold (from the policy)."""
    cost = Cost.of(epsilon=spec.epsilon, rho=spec.rho, delta=spec.delta)
    parts: list[agg.Part] = []
    outputs = [Output(k, "key") for k in spec.group_by]
    quantiles: list[Aggregate] = []
    alphas: dict[str, float] = {}
    for i, a in enumerate(spec.aggregates):
        if a.kind == "count":
            parts.append(agg.Part(f"__p{i}_n", "count", 1.0))
            alphas[f"__p{i}_n"] = ALPHA
            outputs.append(Output(a.name, "count", (f"__p{i}_n",), a))
        elif a.kind in ("sum", "mean"):
            assert a.column is not None
            parts.append(agg.sum_part(f"__p{i}_s", schema.column(a.column)))
            if a.kind == "sum":
                alphas[f"__p{i}_s"] = ALPHA
                outputs.append(Output(a.name, "sum", (f"__p{i}_s",), a))
            else:  # noisy sum / noisy count, each at alpha/2: jointly 1 - alpha
                parts.append(agg.Part(f"__p{i}_n", "count", 1.0))
                alphas.update({f"__p{i}_s": ALPHA / 2, f"__p{i}_n": ALPHA / 2})
                outputs.append(Output(a.name, "mean", (f"__p{i}_s", f"__p{i}_n"), a))
        elif a.kind == "histogram":
            assert a.column is not None
            parts.append(agg.Part(f"__p{i}_h", "histogram", 1.0, column=a.column,
                                  bins=a.bins))
            alphas[f"__p{i}_h"] = ALPHA
            outputs.append(Output(a.name, "histogram", (f"__p{i}_h",), a))
        else:
            quantiles.append(a)
            outputs.append(Output(a.name, a.kind, (), a))
    components = (1 if parts else 0) + len(quantiles) + (1 if spec.keys == "dp" else 0)
    share = cost.amount / components
    keys = agg.public_keys(spec, schema) if spec.group_by and spec.keys == "public" else None
    columns = list(dict.fromkeys([*spec.group_by, *(f.column for f in spec.filters),
                                  *(a.column for a in spec.aggregates if a.column)]))
    if not columns:
        columns = [next(c.name for c in schema.columns if c.classification.value != "L4")]
    result = Plan(spec=spec, schema=schema, cost=cost, columns=columns, keys=keys,
                  parts=parts, outputs=outputs, quantiles=quantiles,
                  d_in=schema.privacy_unit.max_rows_per_unit, share=share, alphas=alphas)
    if spec.keys == "dp":
        result.threshold_epsilon = share
    result.min_group_size = min_group_size
    return result


def _groups(p: Plan, keys: pl.DataFrame | None) -> int:
    return keys.height if keys is not None and p.spec.group_by else 1


def _lengths(p: Plan, groups: int) -> list[int]:
    return [groups * (len(part.bins or ()) - 1 if part.kind == "histogram" else 1)
            for part in p.parts]


def estimate(p: Plan) -> dict[str, Any]:
    """Dry run: the cost and the half-width of each value's interval, without data."""
    result: dict[str, Any] = {"cost": {"unit": p.unit, "amount": p.cost.amount,
                                       "delta": p.cost.delta},
                              "confidence": 1 - ALPHA, "half_width": {}, "rank_error": {}}
    if p.parts:
        scale = mech.linear(lambda _h: [], n_parts=len(p.parts), d_in=p.d_in, unit=p.unit,
                            budget=p.share).scale
        for out in p.outputs:
            if out.kind in ("count", "sum", "histogram"):
                result["half_width"][out.name] = _part_half_width(p, out.parts[0], scale)
    groups = p.keys.height if p.keys is not None else 1
    for q in p.quantiles:
        result["rank_error"][q.name] = _rank_error(
            p, _quantile_calibration(p, q, max(groups, 1)).scale, q)
    return result


def _part(p: Plan, name: str) -> agg.Part:
    return next(part for part in p.parts if part.name == name)


def _part_half_width(p: Plan, name: str, scale: float) -> float:
    part = _part(p, name)
    return mech.half_width(p.unit, scale * part.sensitivity * part.scale_back,
                           p.alphas[name])


def _quantile_calibration(p: Plan, q: Aggregate, groups: int,
                          function: Any = None) -> mech.Calibrated:
    assert q.column is not None
    level = 0.5 if q.kind == "median" else float(q.q or 0.5)
    candidates = agg.quantile_candidates(p.schema.column(q.column))
    return mech.noisy_argmin(function or (lambda _h: []), groups=groups,
                             candidates=len(candidates), sensitivity=max(level, 1 - level),
                             d_in=p.d_in, unit=p.unit, budget=p.share)


def _rank_error(p: Plan, scale: float, q: Aggregate) -> float:
    assert q.column is not None
    m = len(agg.quantile_candidates(p.schema.column(q.column)))
    return float(2 * scale * np.log(m / ALPHA))


def execute(p: Plan, session: Any, handle: mech.DatasetHandle, *, approximate: bool,
            budget_unit: str | None = None) -> dict[str, Any]:
    """Run every measurement of the plan through ``session`` (whose measure is the
    budget's unit, approximate when the policy has a delta); the released table."""
    session_unit = budget_unit or p.unit
    spec, schema = p.spec, p.schema
    keys = p.keys
    extra: dict[str, Any] = {}
    try:
        if spec.keys == "dp":
            keys, extra["threshold"] = _release_keys(p, session, handle, approximate,
                                                     session_unit)
        groups = _groups(p, keys)
        noisy: dict[str, np.ndarray] = {}
        scales: dict[str, float] = {}
        if p.parts:
            def linear_fn(h: mech.DatasetHandle) -> list[float]:
                vectors = agg.exact_parts(h.lazy(p.columns), spec, schema, p.parts, keys)
                return mech.as_floats(np.concatenate(
                    [vectors[part.name] / part.sensitivity for part in p.parts]))

            calibrated = mech.linear(linear_fn, n_parts=len(p.parts), d_in=p.d_in,
                                     unit=p.unit, budget=p.share)
            released = np.asarray(session(mech.adapt(calibrated.measurement, session_unit,
                                                     approximate)), dtype=np.float64)
            offset = 0
            for part, length in zip(p.parts, _lengths(p, groups), strict=True):
                chunk = released[offset:offset + length]
                noisy[part.name] = chunk * part.sensitivity * part.scale_back
                scales[part.name] = calibrated.scale
                offset += length
        chosen: dict[str, list[float]] = {}
        for q in p.quantiles:
            chosen[q.name] = _run_quantile(p, q, keys, groups, session, approximate,
                                           session_unit)
    except Exception as exc:  # data-dependent from here: callers give one generic error
        raise EngineError("a measurement failed") from exc
    return _table(p, keys, groups, noisy, scales, chosen, extra)


def _release_keys(p: Plan, session: Any, handle: mech.DatasetHandle, approximate: bool,
                  session_unit: str) -> tuple[pl.DataFrame, float]:
    spec = p.spec
    calibrated, cut = mech.threshold(
        lambda h: agg.observed_key_counts(h.lazy(p.columns), spec), d_in=p.d_in,
        epsilon=p.threshold_epsilon, delta=p.cost.delta, minimum=p.min_group_size)
    released = session(mech.adapt(calibrated.measurement, session_unit, approximate))
    rows = [agg.decode_key(k, spec) for k in sorted(released)]
    dtypes = {k: (pl.Boolean if p.schema.column(k).type.value == "bool" else pl.String)
              for k in spec.group_by}
    frame = pl.DataFrame(rows, schema=dtypes) if rows else pl.DataFrame(schema=dtypes)
    return frame, cut


def _run_quantile(p: Plan, q: Aggregate, keys: pl.DataFrame | None, groups: int,
                  session: Any, approximate: bool, session_unit: str) -> list[float]:
    assert q.column is not None
    candidates = agg.quantile_candidates(p.schema.column(q.column))

    def scores(h: mech.DatasetHandle) -> list[float]:
        matrix = agg.quantile_scores(h.lazy(p.columns), p.spec, p.schema, q, keys, candidates)
        return mech.as_floats(matrix.reshape(-1))

    calibrated = _quantile_calibration(p, q, max(groups, 1), scores)
    picks = session(mech.adapt(calibrated.measurement, session_unit, approximate))
    return [float(candidates[int(i)]) for i in picks]


def _cell(p: Plan, out: Output, noisy: dict[str, np.ndarray], scales: dict[str, float],
          g: int) -> dict[str, float | None]:
    if out.kind in ("count", "sum"):
        value = float(noisy[out.parts[0]][g])
        hw = _part_half_width(p, out.parts[0], scales[out.parts[0]])
        return {"value": value, "low": value - hw, "high": value + hw}
    s, n = float(noisy[out.parts[0]][g]), float(noisy[out.parts[1]][g])
    a_s = _part_half_width(p, out.parts[0], scales[out.parts[0]])
    a_n = _part_half_width(p, out.parts[1], scales[out.parts[1]])
    mean = s / n if n > 0 else None
    if n - a_n <= 0:
        return {"value": mean, "low": None, "high": None}
    corners = [(s + ds) / (n + dn) for ds in (-a_s, a_s) for dn in (-a_n, a_n)]
    return {"value": mean, "low": min(corners), "high": max(corners)}


def _table(p: Plan, keys: pl.DataFrame | None, groups: int, noisy: dict[str, np.ndarray],
           scales: dict[str, float], chosen: dict[str, list[float]],
           extra: dict[str, Any]) -> dict[str, Any]:
    key_rows = keys.to_dicts() if keys is not None and p.spec.group_by else [{}]
    rows: list[dict[str, Any]] = []
    for g, key_row in enumerate(key_rows[:groups]):
        row: dict[str, Any] = dict(key_row)
        for out in p.outputs:
            if out.kind == "key":
                continue
            if out.kind in ("quantile", "median"):
                assert out.aggregate is not None
                row[out.name] = {"value": chosen[out.name][g],
                                 "rank_error": _rank_error(
                                     p, _quantile_calibration(p, out.aggregate,
                                                              max(groups, 1)).scale,
                                     out.aggregate)}
            elif out.kind == "histogram":
                row[out.name] = _histogram_cell(p, out, noisy, scales, g)
            else:
                row[out.name] = _cell(p, out, noisy, scales, g)
        rows.append(row)
    names = list(p.spec.group_by)
    rows.sort(key=lambda r: tuple("" if r[k] is None else str(r[k]) for k in names))
    return {
        "columns": [{"name": o.name, "kind": o.kind} for o in p.outputs],
        "rows": rows,
        "cost": {"unit": p.unit, "amount": p.cost.amount, "delta": p.cost.delta},
        "epsilon": p.cost.amount if p.unit == "epsilon" else None,
        "rho": p.cost.amount if p.unit == "rho" else None,
        "confidence": 1 - ALPHA,
        "mechanism": "laplace" if p.unit == "epsilon" else "gaussian",
        "keys": p.spec.keys,
        **extra,
    }


def _histogram_cell(p: Plan, out: Output, noisy: dict[str, np.ndarray],
                    scales: dict[str, float], g: int) -> dict[str, Any]:
    part = _part(p, out.parts[0])
    assert part.bins is not None
    n_bins = len(part.bins) - 1
    values = noisy[part.name][g * n_bins:(g + 1) * n_bins]
    hw = _part_half_width(p, part.name, scales[part.name])
    return {"bins": [[part.bins[i], part.bins[i + 1]] for i in range(n_bins)],
            "counts": [{"value": float(v), "low": float(v) - hw, "high": float(v) + hw}
                       for v in values]}
