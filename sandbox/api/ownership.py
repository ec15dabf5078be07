"""The one ownership check for owner actions on a dataset and everything under it.

``check_dataset_owner`` is what the API's owner actions call (403, audited).
``owned_dataset``, ``owned_jobs_query`` and ``job_for`` are the same rule for pages that
*show* owner-only detail (the web pages): there an object the caller may not see is
indistinguishable from a missing one (404).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, false, select
from sqlalchemy.orm import Session

from sandbox.api.deps import require_role
from sandbox.datasets import catalog
from sandbox.db.models import Dataset, Job
from sandbox.errors import Forbidden, NotFound
from sandbox.identity.service import Principal, Role
from sandbox.jobs import service as jobs


def can_own_dataset(principal: Principal, dataset: Dataset) -> bool:
    """Whether the caller is an owner in the dataset's organisation (the rule
    ``check_dataset_owner`` enforces; views use it to decide what to show)."""
    return principal.role == Role.OWNER and dataset.owner_org_id == principal.org_id


def check_dataset_owner(principal: Principal, dataset: Dataset) -> None:
    """403 unless the caller is an owner in the dataset's organisation."""
    require_role(principal, Role.OWNER)
    if dataset.owner_org_id != principal.org_id:
        raise Forbidden(f"dataset {dataset.name!r} belongs to another organisation")


def owned_dataset(session: Session, principal: Principal, name: str) -> Dataset:
    """The dataset ``name`` if the caller owns it (``check_dataset_owner``); ``NotFound``,
    with the message of a missing dataset, when it belongs to another organisation. A
    caller without the owner role gets the role's 403."""
    dataset = catalog.get_dataset(session, name)
    try:
        check_dataset_owner(principal, dataset)
    except Forbidden:
        raise NotFound(f"dataset {name!r} not found") from None
    return dataset


def owned_jobs_query(principal: Principal) -> Select[Any]:
    """Jobs on datasets of the caller's organisation, for an owner; none for other roles."""
    if principal.role != Role.OWNER:
        return select(Job).where(false())
    return select(Job).join(Dataset, Dataset.id == Job.dataset_id).where(
        Dataset.owner_org_id == principal.org_id)


def job_for(session: Session, principal: Principal, job_id: str) -> Job:
    """The job if the caller may see it, else ``NotFound`` (same as missing): the API's
    rule (``jobs.visible_job``) for every role, and for an owner the jobs on their
    organisation's datasets (their state and cost, never their output)."""
    if principal.role == Role.OWNER:
        job = session.get(Job, job_id)
        dataset = session.get(Dataset, job.dataset_id) if job is not None else None
        if job is None or dataset is None or dataset.owner_org_id != principal.org_id:
            raise NotFound(f"job {job_id!r} not found")
        return job
    return jobs.visible_job(session, principal, job_id)


def jobs_query_for(principal: Principal) -> Select[Any]:
    """The jobs ``principal`` may list, by the same rules as ``job_for``."""
    if principal.role == Role.OWNER:
        return owned_jobs_query(principal)
    return jobs.visible_jobs_query(principal)
