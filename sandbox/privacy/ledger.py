"""The budget ledger: the only place privacy budget changes.

Contract:
- ``charge`` runs inside the caller's transaction, *before* any computation on data.
  It locks the dataset's account (SQLite: the transaction already holds the write lock via
  ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR UPDATE``), checks every limit of the
  policy (per query, per job, per organisation, dataset total, delta) in the policy's
  unit, and records the charge, or raises ``BudgetExhausted`` and changes nothing.
- Charges are keyed by ``(job_id, seq)``: charging the same query of the same job again
  returns the first charge (a rerun after a crash is not charged twice).
- Nothing is ever refunded: failed, cancelled and rejected jobs keep their charge.
- Units are never mixed silently (``sandbox.privacy.units``): pure-epsilon charges count
  against a rho budget as epsilon^2/2; rho charges cannot count against an epsilon budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.db.models import BudgetAccount, BudgetCharge, utcnow
from sandbox.errors import Conflict
from sandbox.policies.model import Budget
from sandbox.privacy.units import Cost, UnitMismatch

#: Float sums of decimal costs drift (0.1 * 10 != 1.0); this slack is far below any cost a
#: query may ask for (``spec.MIN_EPSILON``, ``spec.MIN_RHO``).
TOLERANCE = 1e-9


class BudgetExhausted(Conflict):
    """The charge would exceed a limit; the message names the limit, never data."""


@dataclass(frozen=True)
class Spent:
    """What has been spent, by the sums the ledger keeps."""

    epsilon: float = 0.0
    epsilon_sq: float = 0.0
    rho: float = 0.0
    delta: float = 0.0

    def in_unit(self, unit: str) -> float:
        if unit == "rho":
            return self.rho + self.epsilon_sq / 2
        if self.rho > 0:
            raise UnitMismatch("this dataset has zCDP (rho) charges; its budget must be kept "
                               "in rho")
        return self.epsilon


@dataclass(frozen=True)
class ChargeResult:
    unit: str
    amount: float
    spent_after: float
    total: float
    repeated: bool

    @property
    def left(self) -> float:
        return max(0.0, self.total - self.spent_after)


def open_account(session: Session, dataset_id: str) -> None:
    """Create the dataset's account (at registration) so charges have a row to lock."""
    session.add(BudgetAccount(dataset_id=dataset_id))
    session.flush()


def charge(session: Session, *, dataset_id: str, org_id: str, job_id: str, seq: int,
           cost: Cost, budget: Budget) -> ChargeResult:
    """Charge ``cost`` for query ``seq`` of ``job_id``; see the module contract."""
    account = session.scalar(select(BudgetAccount)
                             .where(BudgetAccount.dataset_id == dataset_id)
                             .with_for_update())
    if account is None:
        raise BudgetExhausted("the dataset has no budget account")
    previous = session.scalar(select(BudgetCharge).where(BudgetCharge.job_id == job_id,
                                                         BudgetCharge.seq == seq))
    dataset_spent = _account_spent(account).in_unit(budget.unit)
    if previous is not None:
        return ChargeResult(previous.unit, previous.amount, dataset_spent, budget.total, True)
    amount = cost.in_unit(budget.unit)
    unit = budget.unit
    _check(amount.amount <= budget.query_cap + TOLERANCE,
           f"{amount.amount:g} {unit} is over the policy's per-query cap of "
           f"{budget.query_cap:g}")
    job_spent = spent(session, dataset_id, job_id=job_id).in_unit(unit)
    _check(job_spent + amount.amount <= budget.per_job + TOLERANCE,
           f"budget exhausted for this job: {budget.per_job - job_spent:g} {unit} left of "
           f"the per-job cap {budget.per_job:g}")
    org_spent = spent(session, dataset_id, org_id=org_id).in_unit(unit)
    _check(org_spent + amount.amount <= budget.organisation_cap + TOLERANCE,
           f"budget exhausted for your organisation: "
           f"{max(0.0, budget.organisation_cap - org_spent):g} {unit} left of "
           f"{budget.organisation_cap:g}")
    _check(dataset_spent + amount.amount <= budget.total + TOLERANCE,
           f"budget exhausted: this query needs {amount.amount:g} {unit}, the dataset has "
           f"{max(0.0, budget.total - dataset_spent):g} left of {budget.total:g}")
    _check(account.spent_delta + amount.delta <= budget.total_delta + 1e-18,
           f"delta budget exhausted: {max(0.0, budget.total_delta - account.spent_delta):g} "
           f"left of {budget.total_delta:g}")
    eps = cost.amount if cost.unit == "epsilon" else None
    rho = cost.amount if cost.unit == "rho" else None
    account.spent_epsilon += eps or 0.0
    account.spent_epsilon_sq += (eps or 0.0) ** 2
    account.spent_rho += rho or 0.0
    account.spent_delta += cost.delta
    account.updated_at = utcnow()
    session.add(BudgetCharge(dataset_id=dataset_id, org_id=org_id, job_id=job_id, seq=seq,
                             epsilon=eps, rho=rho, delta=cost.delta, unit=unit,
                             amount=amount.amount, note=amount.converted_from))
    session.flush()
    after = _account_spent(account).in_unit(unit)
    record(session, actor_id=None, action="budget.charged", object_type="job",
           object_id=job_id, detail={"seq": seq, "cost": str(cost), "unit": unit,
                                     "amount": amount.amount, "spent_after": after})
    return ChargeResult(unit, amount.amount, after, budget.total, repeated=False)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BudgetExhausted(message)


def _account_spent(account: BudgetAccount) -> Spent:
    return Spent(account.spent_epsilon, account.spent_epsilon_sq, account.spent_rho,
                 account.spent_delta)


def spent(session: Session, dataset_id: str, *, org_id: str | None = None,
          job_id: str | None = None) -> Spent:
    """What was spent on a dataset, in all, by one organisation or by one job."""
    query = select(func.coalesce(func.sum(BudgetCharge.epsilon), 0.0),
                   func.coalesce(func.sum(BudgetCharge.epsilon * BudgetCharge.epsilon), 0.0),
                   func.coalesce(func.sum(BudgetCharge.rho), 0.0),
                   func.coalesce(func.sum(BudgetCharge.delta), 0.0)).where(
        BudgetCharge.dataset_id == dataset_id)
    if org_id is not None:
        query = query.where(BudgetCharge.org_id == org_id)
    if job_id is not None:
        query = query.where(BudgetCharge.job_id == job_id)
    row = session.execute(query).one()
    return Spent(*(float(v) for v in row))


def summary(session: Session, dataset_id: str, budget: Budget | None,
            org_id: str | None) -> dict[str, object]:
    """Spent and left, in the budget's unit, for the dataset and (optionally) one org."""
    unit = budget.unit if budget else "epsilon"
    total = budget.total if budget else 0.0
    dataset = spent(session, dataset_id).in_unit(unit)
    result: dict[str, object] = {"unit": unit, "total": total, "spent": dataset,
                                 "left": max(0.0, total - dataset),
                                 "delta_total": budget.total_delta if budget else 0.0,
                                 "delta_spent": spent(session, dataset_id).delta}
    if org_id is not None:
        org = spent(session, dataset_id, org_id=org_id).in_unit(unit)
        cap = budget.organisation_cap if budget else 0.0
        result["organisation"] = {"cap": cap, "spent": org,
                                  "left": max(0.0, min(cap - org, total - dataset))}
    return result


def left_for(session: Session, *, dataset_id: str, org_id: str, job_id: str,
             budget: Budget) -> tuple[float, float]:
    """What one job may still spend (amount in the budget's unit, delta): the smallest of
    what the dataset, the organisation and the job's cap have left. A broker session's
    OpenDP filter is sized to this."""
    unit = budget.unit
    dataset = spent(session, dataset_id)
    left = min(budget.total - dataset.in_unit(unit),
               budget.organisation_cap - spent(session, dataset_id, org_id=org_id).in_unit(unit),
               budget.per_job - spent(session, dataset_id, job_id=job_id).in_unit(unit))
    # the same slack the charge was accepted with: float sums of decimal costs drift
    return max(0.0, left) + TOLERANCE, max(0.0, budget.total_delta - dataset.delta)
