"""The query spec: the only thing the broker accepts from an analyst.

A spec is declarative and frozen: filters, a group-by on owner-declared keys (or on keys
released by DP thresholding), a list of aggregates and a privacy cost. It never carries
code or serialized plans; the engine builds the Polars plan itself. ``version`` lets the
wire format evolve. DP-SQL (``sandbox.privacy.sql``) compiles to the same spec.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = str | int | float | bool

#: Bounds on costs a query may ask for (attack catalogue 20): below them the noise swamps
#: any answer and the arithmetic of the accountant loses meaning; above them the
#: guarantee is void.
MIN_EPSILON, MAX_EPSILON = 1e-3, 100.0
MIN_RHO, MAX_RHO = 1e-6, 100.0
MIN_DELTA, MAX_DELTA = 1e-15, 1e-3
MAX_BINS = 1000


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Filter(_Frozen):
    """``column op value``; ``in`` and ``not_in`` take a list of values."""

    column: str = Field(min_length=1, max_length=64)
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in"]
    value: Scalar | list[Scalar]

    @model_validator(mode="after")
    def _value_shape(self) -> Filter:
        if self.op in ("in", "not_in"):
            if not isinstance(self.value, list) or not 1 <= len(self.value) <= 1000:
                raise ValueError(f"filter on {self.column!r}: {self.op} needs a list of 1-1000 "
                                 "values")
        elif isinstance(self.value, list):
            raise ValueError(f"filter on {self.column!r}: {self.op} needs a single value")
        values = self.value if isinstance(self.value, list) else [self.value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"filter on {self.column!r}: value must be finite")
        return self


class Aggregate(_Frozen):
    """One released statistic.

    - ``count``: rows (no column).
    - ``sum`` / ``mean``: of a numeric column, each value clipped to the owner's bounds.
    - ``quantile`` (with ``q`` in (0, 1)) / ``median``: chosen among candidates spread
      over the owner's bounds (exponential mechanism).
    - ``histogram``: row counts per bin of a numeric column over public ``bins`` edges.
    """

    kind: Literal["count", "sum", "mean", "quantile", "median", "histogram"]
    column: str | None = Field(default=None, max_length=64)
    q: float | None = Field(default=None, gt=0, lt=1)
    bins: tuple[float, ...] | None = Field(default=None, min_length=2, max_length=MAX_BINS + 1)
    alias: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

    @model_validator(mode="after")
    def _shape(self) -> Aggregate:
        if self.kind == "count":
            if self.column is not None:
                raise ValueError("count takes no column (it counts rows)")
        elif not self.column:
            raise ValueError(f"{self.kind} needs a column")
        if (self.kind == "quantile") != (self.q is not None):
            raise ValueError("q is given with quantile, and only with quantile")
        if (self.kind == "histogram") != (self.bins is not None):
            raise ValueError("bins are given with histogram, and only with histogram")
        if self.bins is not None:
            if not all(math.isfinite(b) for b in self.bins):
                raise ValueError("histogram bins must be finite")
            if any(b >= a for b, a in zip(self.bins, self.bins[1:], strict=False)):
                raise ValueError("histogram bins must be strictly increasing")
        return self

    @property
    def name(self) -> str:
        """The output column name."""
        if self.alias:
            return self.alias
        if self.kind == "count":
            return "count"
        if self.kind == "quantile":
            return f"quantile_{round((self.q or 0) * 100):g}_{self.column}"
        return f"{self.kind}_{self.column}"


def _positive_number(value: object, name: str) -> object:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite")
    return value


class QuerySpec(_Frozen):
    """A differentially private (or, under an SDC policy, disclosure-checked) aggregate
    query over one dataset, with its privacy cost stated up front."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra={"examples": [{
        "dataset": "enterprises",
        "filters": [{"column": "industry", "op": "==", "value": "manufacturing"}],
        "group_by": ["city"],
        "aggregates": [{"kind": "count"}, {"kind": "sum", "column": "annual_revenue"},
                       {"kind": "median", "column": "founded_year"}],
        "epsilon": 0.5}]})

    version: Literal[1] = 1
    dataset: str = Field(min_length=1, max_length=64)
    filters: tuple[Filter, ...] = Field(default=(), max_length=20)
    group_by: tuple[str, ...] = Field(default=(), max_length=3)
    keys: Literal["public", "dp"] = Field(
        default="public", description="public: the owner's declared key sets; dp: keys "
        "released by DP thresholding (needs delta and a policy that allows it)")
    aggregates: tuple[Aggregate, ...] = Field(min_length=1, max_length=10)
    epsilon: float | None = Field(default=None, description="pure-DP cost (Laplace)")
    rho: float | None = Field(default=None, description="zCDP cost (Gaussian)")
    delta: float | None = Field(default=None, description="only for keys='dp'")

    @field_validator("epsilon", "rho", "delta", mode="before")
    @classmethod
    def _numbers(cls, value: object, info: object) -> object:
        return _positive_number(value, getattr(info, "field_name", "cost"))

    @model_validator(mode="after")
    def _checks(self) -> QuerySpec:
        names = [a.name for a in self.aggregates]
        if len(set(names)) != len(names):
            raise ValueError("aggregate output names must be unique (set alias)")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("group_by lists a column twice")
        if set(names) & set(self.group_by):
            raise ValueError("an aggregate name collides with a group_by column")
        if self.epsilon is not None and self.rho is not None:
            raise ValueError("give the cost as epsilon or as rho, not both")
        if self.epsilon is not None and not MIN_EPSILON <= self.epsilon <= MAX_EPSILON:
            raise ValueError(f"epsilon must be between {MIN_EPSILON} and {MAX_EPSILON}")
        if self.rho is not None and not MIN_RHO <= self.rho <= MAX_RHO:
            raise ValueError(f"rho must be between {MIN_RHO} and {MAX_RHO}")
        if self.delta is not None and not MIN_DELTA <= self.delta <= MAX_DELTA:
            raise ValueError(f"delta must be between {MIN_DELTA} and {MAX_DELTA}")
        if self.keys == "dp":
            if not self.group_by:
                raise ValueError("keys='dp' needs a group_by")
            if self.delta is None:
                raise ValueError("keys='dp' (thresholding) needs a delta")
        elif self.delta is not None:
            raise ValueError("delta is only used with keys='dp'")
        return self

    @property
    def has_cost(self) -> bool:
        return self.epsilon is not None or self.rho is not None
