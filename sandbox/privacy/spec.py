"""The query spec: the only thing the broker accepts from an analyst.

A spec is declarative and frozen: filters, a group-by on owner-declared keys, a list of
aggregates and a privacy cost. It never carries code or serialized plans; the engine
builds the Polars plan itself. ``version`` lets the wire format evolve.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Scalar = str | int | float | bool

#: Smallest epsilon a query may ask for: below it the noise swamps any answer and the
#: arithmetic of the accountant loses meaning (attack catalogue 20).
MIN_EPSILON = 1e-3
MAX_EPSILON = 100.0


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
    """``count`` (rows), or ``sum``/``mean`` of a numeric column within the owner's bounds."""

    kind: Literal["count", "sum", "mean"]
    column: str | None = Field(default=None, max_length=64)
    alias: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

    @model_validator(mode="after")
    def _column_needed(self) -> Aggregate:
        if self.kind == "count" and self.column is not None:
            raise ValueError("count takes no column (it counts rows)")
        if self.kind != "count" and not self.column:
            raise ValueError(f"{self.kind} needs a column")
        return self

    @property
    def name(self) -> str:
        """The output column name."""
        if self.alias:
            return self.alias
        return "count" if self.kind == "count" else f"{self.kind}_{self.column}"


class QuerySpec(_Frozen):
    """A differentially private aggregate query over one dataset."""

    version: Literal[1] = 1
    dataset: str = Field(min_length=1, max_length=64)
    filters: tuple[Filter, ...] = Field(default=(), max_length=20)
    group_by: tuple[str, ...] = Field(default=(), max_length=3)
    aggregates: tuple[Aggregate, ...] = Field(min_length=1, max_length=10)
    epsilon: float

    @field_validator("epsilon", mode="before")
    @classmethod
    def _epsilon_number(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("epsilon must be a number")
        return value

    @field_validator("epsilon")
    @classmethod
    def _epsilon_range(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("epsilon must be finite")
        if not MIN_EPSILON <= value <= MAX_EPSILON:
            raise ValueError(f"epsilon must be between {MIN_EPSILON} and {MAX_EPSILON}")
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> QuerySpec:
        names = [a.name for a in self.aggregates]
        if len(set(names)) != len(names):
            raise ValueError("aggregate output names must be unique (set alias)")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("group_by lists a column twice")
        if set(names) & set(self.group_by):
            raise ValueError("an aggregate name collides with a group_by column")
        return self
