"""Privacy-loss value objects that refuse to mix units silently.

A dataset's policy keeps its budget in one unit: ``epsilon`` (pure or approximate DP,
composed by adding epsilons and deltas) or ``rho`` (zero-concentrated DP, composed by
adding rhos, plus deltas where thresholding needs them). A query states its cost as
epsilon or as rho. The only conversion applied is the exact one: a pure epsilon-DP cost
is (epsilon^2 / 2)-zCDP; it is recorded on the charge. A rho cost is never turned into an
epsilon without an explicit delta, so it is refused against an epsilon budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sandbox.errors import Invalid

Unit = Literal["epsilon", "rho"]


class UnitMismatch(Invalid):
    """A cost in one unit was offered to a budget in another without a valid conversion."""


@dataclass(frozen=True)
class Cost:
    """The privacy cost of one query, in the unit the analyst stated."""

    unit: Unit
    amount: float
    delta: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.amount) and self.amount > 0):
            raise ValueError(f"a {self.unit} cost must be a positive finite number")
        if not (math.isfinite(self.delta) and 0 <= self.delta < 1):
            raise ValueError("delta must be in [0, 1)")

    @classmethod
    def of(cls, *, epsilon: float | None = None, rho: float | None = None,
           delta: float | None = None) -> Cost:
        if (epsilon is None) == (rho is None):
            raise Invalid("state the cost as exactly one of epsilon or rho")
        if epsilon is not None:
            return cls("epsilon", float(epsilon), float(delta or 0.0))
        assert rho is not None
        return cls("rho", float(rho), float(delta or 0.0))

    def in_unit(self, budget_unit: Unit) -> Charge:
        """This cost as a charge against a budget kept in ``budget_unit``."""
        if self.unit == budget_unit:
            return Charge(budget_unit, self.amount, self.delta, converted_from=None)
        if self.unit == "epsilon" and budget_unit == "rho":
            return Charge("rho", self.amount ** 2 / 2, self.delta,
                          converted_from=f"epsilon {self.amount:g} is rho {self.amount**2/2:g}")
        raise UnitMismatch("this dataset's budget is kept in epsilon; a rho (zCDP) cost cannot "
                           "be charged to it without a delta: state the cost as epsilon")

    def __str__(self) -> str:
        text = f"{self.unit} {self.amount:g}"
        return f"{text}, delta {self.delta:g}" if self.delta else text


@dataclass(frozen=True)
class Charge:
    """A cost expressed in the budget's unit, ready for the ledger."""

    unit: Unit
    amount: float
    delta: float
    converted_from: str | None

    def __add__(self, other: Charge) -> Charge:
        if other.unit != self.unit:
            raise UnitMismatch(f"cannot add {other.unit} to {self.unit}")
        return Charge(self.unit, self.amount + other.amount, self.delta + other.delta, None)
