"""Read-side summaries of jobs for their datasets' owners and the pages: state, kind,
cost and who asked, never the query's output."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.db.models import BudgetCharge, Dataset, Job, Organisation


def org_names(session: Session) -> dict[str, str]:
    return dict(session.execute(select(Organisation.id, Organisation.name)).tuples().all())


def charged_by_job(session: Session, job_ids: list[str]) -> dict[str, float]:
    """What the ledger charged each job, in the budget's unit."""
    if not job_ids:
        return {}
    rows = session.execute(select(BudgetCharge.job_id, func.sum(BudgetCharge.amount))
                           .where(BudgetCharge.job_id.in_(job_ids))
                           .group_by(BudgetCharge.job_id)).tuples().all()
    return {job_id: float(amount or 0.0) for job_id, amount in rows}


def job_rows(session: Session, jobs: list[Job]) -> list[dict[str, Any]]:
    """One line per job for the job tables (state and cost; never output)."""
    names = org_names(session)
    datasets = dict(session.execute(select(Dataset.id, Dataset.name).where(
        Dataset.id.in_({j.dataset_id for j in jobs}))).tuples().all()) if jobs else {}
    charged = charged_by_job(session, [j.id for j in jobs])
    return [{"id": j.id, "dataset": datasets.get(j.dataset_id, "?"),
             "version": j.dataset_version, "kind": j.kind, "status": j.status,
             "organisation": names.get(j.org_id, "?"), "created_at": j.created_at,
             "finished_at": j.finished_at, "charged": charged.get(j.id),
             "review_required": j.review_required} for j in jobs]
