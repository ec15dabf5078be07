"""The budget ledger: the only place privacy budget changes.

Contract:
- ``charge`` runs inside the caller's transaction, *before* any computation on data.
  It locks the dataset's account (SQLite: the transaction already holds the write lock via
  ``BEGIN IMMEDIATE``; PostgreSQL: ``SELECT ... FOR UPDATE``), checks every limit and
  records the charge, or raises ``BudgetExhausted`` and changes nothing.
- Charges are keyed by ``(job_id, seq)``: charging the same query of the same job again
  returns the first charge (a rerun after a crash is not charged twice).
- Nothing is ever refunded: failed, cancelled and rejected jobs keep their charge.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.db.models import BudgetAccount, BudgetCharge, utcnow
from sandbox.errors import Conflict

#: Float sums of decimal epsilons drift (0.1 * 10 != 1.0); this slack is far below any
#: epsilon a query may ask for (``spec.MIN_EPSILON``).
TOLERANCE = 1e-9


class BudgetExhausted(Conflict):
    """The charge would exceed a limit; the message names the limit, never data."""


@dataclass(frozen=True)
class Charge:
    epsilon: float
    spent_after: float
    total: float
    repeated: bool

    @property
    def left(self) -> float:
        return max(0.0, self.total - self.spent_after)


def open_account(session: Session, dataset_id: str) -> None:
    """Create the dataset's account (at registration) so charges have a row to lock."""
    session.add(BudgetAccount(dataset_id=dataset_id, spent_epsilon=0.0))
    session.flush()


def charge(session: Session, *, dataset_id: str, org_id: str, job_id: str, seq: int,
           epsilon: float, total_epsilon: float) -> Charge:
    """Charge ``epsilon`` to the dataset for query ``seq`` of ``job_id``; see module contract."""
    account = session.scalar(select(BudgetAccount)
                             .where(BudgetAccount.dataset_id == dataset_id)
                             .with_for_update())
    if account is None:
        raise BudgetExhausted("the dataset has no budget account")
    previous = session.scalar(select(BudgetCharge).where(BudgetCharge.job_id == job_id,
                                                         BudgetCharge.seq == seq))
    if previous is not None:
        return Charge(previous.epsilon, account.spent_epsilon, total_epsilon, repeated=True)
    if account.spent_epsilon + epsilon > total_epsilon + TOLERANCE:
        raise BudgetExhausted(
            f"budget exhausted: this query needs epsilon {epsilon:g}, the dataset has "
            f"{max(0.0, total_epsilon - account.spent_epsilon):g} left of {total_epsilon:g}")
    account.spent_epsilon += epsilon
    account.updated_at = utcnow()
    session.add(BudgetCharge(dataset_id=dataset_id, org_id=org_id, job_id=job_id, seq=seq,
                             epsilon=epsilon))
    session.flush()
    record(session, actor_id=None, action="budget.charged", object_type="job",
           object_id=job_id, detail={"seq": seq, "epsilon": epsilon,
                                     "spent_after": account.spent_epsilon})
    return Charge(epsilon, account.spent_epsilon, total_epsilon, repeated=False)


def spent(session: Session, dataset_id: str, org_id: str | None = None) -> float:
    """Epsilon spent on a dataset, in all or by one organisation."""
    query = select(func.coalesce(func.sum(BudgetCharge.epsilon), 0.0)).where(
        BudgetCharge.dataset_id == dataset_id)
    if org_id is not None:
        query = query.where(BudgetCharge.org_id == org_id)
    return float(session.scalar(query) or 0.0)
