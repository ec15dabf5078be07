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
from sandbox.yamltext import too_deep


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
    """Privacy budget limits, all in ``unit`` (see ``sandbox.privacy.units``)."""

    unit: Literal["epsilon", "rho"] = "epsilon"
    total: float = Field(gt=0, le=100, description="everything anyone may ever spend")
    per_job: float = Field(gt=0, le=100)
    per_query: float | None = Field(default=None, gt=0, le=100)
    per_organisation: float | None = Field(default=None, gt=0, le=100)
    total_delta: float = Field(default=0.0, ge=0, le=1e-3,
                               description="delta available to DP key release (thresholding)")

    @field_validator("total", "per_job", "per_query", "per_organisation", "total_delta")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @model_validator(mode="after")
    def _caps_within_total(self) -> Budget:
        for name in ("per_job", "per_query", "per_organisation"):
            value = getattr(self, name)
            if value is not None and value > self.total:
                raise ValueError(f"{name} cannot exceed total")
        return self

    @property
    def query_cap(self) -> float:
        return min(self.per_job, self.per_query or self.per_job)

    @property
    def organisation_cap(self) -> float:
        return self.per_organisation or self.total


QueryKind = Literal["count", "sum", "mean", "quantile", "median", "histogram"]
ALL_KINDS: tuple[QueryKind, ...] = ("count", "sum", "mean", "quantile", "median", "histogram")


class QueryRules(_Frozen):
    """What kinds of query the policy allows."""

    kinds: tuple[QueryKind, ...] = ALL_KINDS
    dp_keys: bool = Field(default=False, description="allow keys released by DP thresholding")
    min_group_size: int = Field(default=10, ge=1, le=10_000,
                                description="floor of the DP key threshold; SDC cell minimum")


class SdcSettings(_Frozen):
    """Statistical disclosure control rules (``mode: sdc``)."""

    threshold: int = Field(default=10, ge=1)
    p_percent: float = Field(default=10.0, gt=0, lt=100)
    nk_n: int = Field(default=2, ge=1)
    nk_k: float = Field(default=0.9, gt=0, le=1)
    rounding_base: int = Field(default=5, ge=1)


Level = Literal["L1", "L2", "L3", "L4"]

DEFAULT_CLASSIFICATION_RULES: dict[Level, tuple[ColumnUse, ...]] = {
    "L1": (ColumnUse.GROUP_BY, ColumnUse.FILTER, ColumnUse.AGGREGATE),
    "L2": (ColumnUse.AGGREGATE,),
    "L3": (ColumnUse.AGGREGATE,),
    "L4": (),
}


class ScriptLimits(_Frozen):
    """Per-job limits for script jobs."""

    wall_seconds: float = Field(default=120, gt=0, le=3600)
    cpu_seconds: int = Field(default=120, ge=1, le=3600)
    memory_mb: int = Field(default=1024, ge=64, le=65536)
    processes: int = Field(default=64, ge=4, le=4096)
    output_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024)
    queries: int = Field(default=100, ge=1, le=100_000)


class PolicyDocument(_Frozen):
    """A parsed, validated policy. Immutable; a change is a new version."""

    dataset: str = Field(min_length=1, max_length=64)
    purpose: str = Field(min_length=1, max_length=2000)
    mode: Literal["dp", "sdc"] = "dp"
    grants: tuple[Grant, ...] = Field(min_length=1)
    budget: Budget
    review_required: bool = True
    approvals: int = Field(default=1, ge=1, le=2,
                           description="2 = two-person rule: two distinct reviewers")
    queries: QueryRules = Field(default_factory=QueryRules)
    sdc: SdcSettings = Field(default_factory=SdcSettings)
    scripts: ScriptLimits = Field(default_factory=ScriptLimits)
    timing_quantum_ms: int = Field(default=0, ge=0, le=60_000,
                                   description="broker replies are padded to multiples of this")
    classification: dict[Level, tuple[ColumnUse, ...]] = Field(
        default_factory=lambda: dict(DEFAULT_CLASSIFICATION_RULES)
    )

    @model_validator(mode="after")
    def _consistent(self) -> PolicyDocument:
        if self.classification.get("L4"):
            raise ValueError("classification.L4: core columns can never be queried")
        if self.mode == "sdc" and not self.review_required:
            raise ValueError("review_required: SDC outputs always go to human review")
        if self.queries.dp_keys and self.budget.total_delta <= 0:
            raise ValueError("queries.dp_keys needs budget.total_delta > 0")
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
        if len(text) > 200_000:
            raise PolicyError("policy YAML is larger than 200000 characters")
        if too_deep(text):
            raise PolicyError("policy YAML is nested too deeply")
        try:
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.AliasEvent):
                    raise PolicyError("policy YAML must not use aliases (*ref)")
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"policy is not valid YAML: {exc}") from None
        except (ValueError, OverflowError, RecursionError) as exc:  # dates, huge ints, depth
            raise PolicyError(f"policy YAML has a value that cannot be read: "
                              f"{type(exc).__name__}") from None
        if not isinstance(raw, dict):
            raise PolicyError("policy must be a YAML mapping")
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise PolicyError(format_validation_error(exc, "policy")) from None
        except RecursionError:
            raise PolicyError("policy YAML is nested too deeply") from None


def format_validation_error(exc: ValidationError, what: str) -> str:
    """One readable line per problem: ``policy.budget.total_epsilon: must be ...``."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{what}.{loc}: {err['msg']}" if loc else f"{what}: {err['msg']}")
    return "; ".join(parts)
