"""Exact aggregates under statistical disclosure control (a policy's ``mode: sdc``).

Inside the broker: per cell, the exact count of contributing units, and for sums the
total and the largest per-unit contributions (``sdc.cell_stats``); then the policy's
rules (``sdc.apply_sdc``): minimum cell size, p% and n,k dominance, secondary
suppression, rounding. The findings go to the reviewer; SDC outputs always need human
review (the policy model enforces it). No privacy budget is charged: SDC gives no DP
guarantee, which is why a person must look.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from sandbox.datasets.schema import ColumnType, DatasetSchema
from sandbox.policies.model import SdcSettings
from sandbox.privacy import aggregate as agg
from sandbox.privacy import sdc
from sandbox.privacy.mechanisms import DatasetHandle
from sandbox.privacy.spec import QuerySpec

_ALL = "__all"


def rules_of(settings: SdcSettings) -> sdc.SdcRules:
    return sdc.SdcRules(threshold=settings.threshold, p_percent=settings.p_percent,
                        nk_n=settings.nk_n, nk_k=settings.nk_k,
                        rounding_base=settings.rounding_base)


def execute(spec: QuerySpec, schema: DatasetSchema, settings: SdcSettings,
            handle: DatasetHandle) -> dict[str, Any]:
    rules = rules_of(settings)
    unit = schema.privacy_unit.id_column
    columns = list(dict.fromkeys([*spec.group_by, *(f.column for f in spec.filters),
                                  *(a.column for a in spec.aggregates if a.column),
                                  *([unit] if unit else [])]))
    data = agg.filtered(handle.lazy(columns), spec)
    keys = list(spec.group_by) or [_ALL]
    if not spec.group_by:
        data = data.with_columns(pl.lit("all").alias(_ALL))
    grid = agg.public_keys(spec, schema) if spec.group_by else pl.DataFrame({_ALL: ["all"]})
    table = grid
    findings: list[str] = []
    for a in spec.aggregates:
        if a.kind == "count":
            result = _apply(data, grid, keys, None, unit, rules, "count")
            table = table.join(_cells(result, keys, a.name, "count"), on=keys, how="left",
                               nulls_equal=True)
            findings += [f"{a.name}: {f}" for f in result.findings]
        elif a.kind in ("sum", "mean"):
            assert a.column is not None
            column = schema.column(a.column)
            lo, hi = agg.bounds(column)
            value = pl.col(a.column).cast(pl.Float64)
            if column.type == ColumnType.FLOAT:
                value = value.fill_nan(None)
            clipped = data.with_columns(value.fill_null(0.0).clip(max(lo, 0.0), hi)
                                        .alias("__v"))
            sums = _apply(clipped, grid, keys, "__v", unit, rules, "sum")
            findings += [f"{a.name}: {f}" for f in sums.findings]
            if a.kind == "sum":
                table = table.join(_cells(sums, keys, a.name, "sum"), on=keys, how="left",
                                   nulls_equal=True)
            else:
                counts = _apply(data, grid, keys, None, unit, rules, "count")
                table = table.join(_mean(sums, counts, keys, a.name), on=keys, how="left",
                                   nulls_equal=True)
        else:
            raise ValueError(f"{a.kind} is not available under SDC")
    rows = []
    for row in table.to_dicts():
        row.pop(_ALL, None)
        rows.append(row)
    return {"columns": [*({"name": k, "kind": "key"} for k in spec.group_by),
                        *({"name": a.name, "kind": a.kind} for a in spec.aggregates)],
            "rows": rows, "mode": "sdc", "findings": findings,
            "rules": {"threshold": rules.threshold, "p_percent": rules.p_percent,
                      "nk": [rules.nk_n, rules.nk_k], "rounding_base": rules.rounding_base},
            "cost": None}


def _apply(data: pl.LazyFrame, grid: pl.DataFrame, keys: list[str], value: str | None,
           unit: str | None, rules: sdc.SdcRules, kind: str) -> sdc.SdcResult:
    stats = sdc.cell_stats(data, keys, value, unit, top_n=max(2, rules.nk_n))
    cells = grid.join(stats, on=keys, how="left", nulls_equal=True).fill_null(0)
    return sdc.apply_sdc(cells, keys, rules, kind="count" if kind == "count" else "sum")


def _cells(result: sdc.SdcResult, keys: list[str], name: str, kind: str) -> pl.DataFrame:
    return result.table.select(
        *keys, pl.struct(pl.col(kind).cast(pl.Float64).alias("value"),
                         pl.col("status")).alias(name))


def _mean(sums: sdc.SdcResult, counts: sdc.SdcResult, keys: list[str],
          name: str) -> pl.DataFrame:
    joined = sums.table.join(counts.table, on=keys, how="left", suffix="_n",
                             nulls_equal=True)
    ok = (pl.col("status") == "ok") & (pl.col("status_n") == "ok") & (pl.col("count") > 0)
    value = pl.when(ok).then(pl.col("sum") / pl.col("count")).otherwise(None)
    status = pl.when(pl.col("status") != "ok").then(pl.col("status")) \
        .otherwise(pl.col("status_n"))
    return joined.select(*keys, pl.struct(value.alias("value"),
                                          status.alias("status")).alias(name))
