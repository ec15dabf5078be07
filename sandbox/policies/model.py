"""The policy document a data owner writes (YAML) and approves.

A policy says who may query a dataset (organisations and until when), how much privacy
budget the dataset and each job may spend, what each classification level of column may
be used for, and whether a human reviewer must approve each release. See
``docs/reference/policy.md`` and ``policies/`` for examples.
"""

from __future__ import annotations

import math
from datetime import date
from enum import StrEnum
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandbox.errors import Invalid


class PolicyError(Invalid):
    """A policy document that cannot be accepted; the message names the field."""


class ColumnUse(StrEnum):
    GROUP_BY = "group_by"
    FILTER = "filter"
    AGGREGATE = "aggregate"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Grant(_Frozen):
    organisation: str = Field(min_length=1, max_length=100)
    expires: date | None = None


class Budget(_Frozen):
    total_epsilon: float = Field(gt=0, le=100)
    per_job_epsilon: float = Field(gt=0, le=100)

    @field_validator("total_epsilon", "per_job_epsilon")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _cap_within_total(self) -> Budget:
        if self.per_job_epsilon > self.total_epsilon:
            raise ValueError("per_job_epsilon cannot exceed total_epsilon")
        return self


Level = Literal["L1", "L2", "L3", "L4"]

DEFAULT_CLASSIFICATION_RULES: dict[Level, tuple[ColumnUse, ...]] = {
    "L1": (ColumnUse.GROUP_BY, ColumnUse.FILTER, ColumnUse.AGGREGATE),
    "L2": (ColumnUse.AGGREGATE,),
    "L3": (ColumnUse.AGGREGATE,),
    "L4": (),
}


class PolicyDocument(_Frozen):
    """A parsed, validated policy. Immutable; a change is a new version."""

    dataset: str = Field(min_length=1, max_length=64)
    purpose: str = Field(min_length=1, max_length=2000)
    mode: Literal["dp"] = "dp"
    grants: tuple[Grant, ...] = Field(min_length=1)
    budget: Budget
    review_required: bool = True
    classification: dict[Level, tuple[ColumnUse, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_CLASSIFICATION_RULES)
    )

    @model_validator(mode="after")
    def _l4_never(self) -> PolicyDocument:
        if self.classification.get("L4"):
            raise ValueError("classification.L4: core columns can never be queried")
        return self

    def uses_for(self, level: str) -> tuple[ColumnUse, ...]:
        """What a column of classification ``level`` may be used for (nothing if unlisted)."""
        return tuple(self.classification.get(level, ()))  # type: ignore[call-overload]

    def grant_for(self, organisation: str, today: date) -> Grant | None:
        """The grant that lets ``organisation`` query today, if any."""
        for grant in self.grants:
            if grant.organisation == organisation and (grant.expires is None
                                                       or grant.expires >= today):
                return grant
        return None

    @classmethod
    def from_yaml(cls, text: str) -> PolicyDocument:
        """Parse and validate; raises ``PolicyError`` naming the bad field."""
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"policy is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise PolicyError("policy must be a YAML mapping")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise PolicyError(format_validation_error(exc, "policy")) from None


def format_validation_error(exc: ValidationError, what: str) -> str:
    """One readable line per problem: ``policy.budget.total_epsilon: must be ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{what}.{loc}: {err['msg']}" if loc else f"{what}: {err['msg']}")
    return "; ".join(parts)
