"""What the owner and job pages show, gathered from the services (read only).

Nothing here decides who may see what: callers pass objects they obtained through
``sandbox.api.ownership`` or ``sandbox.jobs.service`` (the API's checks). Nothing here
reads a dataset's rows; the exact row count is shown only when the schema marks it
public.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.datasets import catalog
from sandbox.datasets.schema import DatasetSchema
from sandbox.db.models import (
    AuditEvent,
    BudgetCharge,
    Dataset,
    DatasetVersion,
    Job,
    Policy,
    Review,
    User,
)
from sandbox.identity.service import Principal, Role
from sandbox.jobs.states import JobStatus
from sandbox.jobs.summary import job_rows, org_names
from sandbox.policies.model import PolicyDocument
from sandbox.policies.service import document, policy_in_force
from sandbox.privacy import ledger
from sandbox.review.signing import Signer
from sandbox.web.outputs import ReleaseInfo, release_info

LEVELS = {"L1": "public", "L2": "internal", "L3": "sensitive", "L4": "core (never queryable)"}


def user_names(session: Session, ids: set[str]) -> dict[str, str]:
    if not ids:
        return {}
    return dict(session.execute(select(User.id, User.name).where(User.id.in_(ids)))
                .tuples().all())


def actor_labels(session: Session, principal: Principal, ids: set[str]) -> dict[str, str]:
    """How the pages name the people behind events: by name within the viewer's own
    organisation (or to an admin); elsewhere by role and organisation only, as the API,
    which never shows who submitted or reviewed a job, would have it."""
    if not ids:
        return {}
    orgs = org_names(session)
    labels = {}
    for user in session.scalars(select(User).where(User.id.in_(ids))):
        if principal.role == Role.ADMIN or user.org_id == principal.org_id:
            labels[user.id] = user.name
        else:
            labels[user.id] = f"{user.role} of {orgs.get(user.org_id, '?')}"
    return labels


@dataclass(frozen=True)
class VersionRow:
    version: int
    created_at: Any
    key_id: str
    ciphertext_sha256: str
    row_count: int | None  # only when the schema says the count is public


def versions(session: Session, dataset: Dataset) -> list[VersionRow]:
    rows = list(session.scalars(select(DatasetVersion).where(
        DatasetVersion.dataset_id == dataset.id).order_by(DatasetVersion.version)))
    latest_public = bool(rows) and catalog.schema_of(rows[-1]).row_count_public
    return [VersionRow(v.version, v.created_at, v.key_id, v.ciphertext_sha256,
                       v.row_count if latest_public else None) for v in rows]


def schema_columns(schema: DatasetSchema, doc: PolicyDocument | None) -> list[dict[str, Any]]:
    """Each column with its classification and what the policy in force lets it be used
    for."""
    columns = []
    for col in schema.columns:
        level = col.classification.value
        categories = col.categories or []
        columns.append({
            "name": col.name, "type": col.type.value, "level": level,
            "level_name": LEVELS.get(level, ""), "nullable": col.nullable,
            "bounds": col.bounds, "categories": categories[:20],
            "more_categories": max(0, len(categories) - 20),
            "description": col.description, "on_out_of_bounds": col.on_out_of_bounds,
            "uses": [u.value for u in doc.uses_for(level)] if doc else None})
    return columns


def budget_view(session: Session, dataset: Dataset,
                policy: Policy | None) -> dict[str, Any]:
    """The ledger's summary for the dataset, and one line per organisation that holds a
    grant or has spent on it."""
    doc = document(policy) if policy else None
    budget = doc.budget if doc else None
    summary = ledger.summary(session, dataset.id, budget, None)
    names = org_names(session)
    org_ids = set(session.scalars(select(BudgetCharge.org_id).distinct().where(
        BudgetCharge.dataset_id == dataset.id)))
    by_name = {name: oid for oid, name in names.items()}
    granted = {g.organisation: g.expires for g in doc.grants} if doc else {}
    org_ids |= {by_name[n] for n in granted if n in by_name}
    orgs = []
    for org_id in sorted(org_ids, key=lambda o: names.get(o, o)):
        line = ledger.summary(session, dataset.id, budget, org_id)["organisation"]
        name = names.get(org_id, org_id)
        orgs.append({"name": name, "granted": name in granted, "expires": granted.get(name),
                     **line})  # type: ignore[dict-item]
    return {**summary, "organisations": orgs, "has_policy": doc is not None}


def job_summary(session: Session, job: Job) -> dict[str, Any]:
    """The facts of one job that every role that can see it may read."""
    (row,) = job_rows(session, [job])
    policy = session.get(Policy, job.policy_id)
    doc = document(policy) if policy else None
    approvals = session.scalar(select(func.count()).select_from(Review).where(
        Review.job_id == job.id, Review.decision == "approved")) or 0
    return {**row, "epsilon": job.epsilon, "rho": job.rho, "error": job.error_public,
            "attempts": job.attempts, "policy_version": policy.version if policy else None,
            "mode": doc.mode if doc else None, "approvals": approvals,
            "approvals_required": doc.approvals if doc else 1,
            "budget_unit": doc.budget.unit if doc else None}


def timeline(session: Session, principal: Principal, job: Job) -> list[dict[str, Any]]:
    """The job's audit events, oldest first: what happened, when, who (``actor_labels``)."""
    events = list(session.scalars(select(AuditEvent).where(
        AuditEvent.object_type == "job", AuditEvent.object_id == job.id)
        .order_by(AuditEvent.seq)))
    names = actor_labels(session, principal, {e.actor_id for e in events if e.actor_id})
    return [{"seq": e.seq, "at": e.at, "action": e.action,
             "actor": names.get(e.actor_id, "") if e.actor_id else "system",
             "detail": e.detail} for e in events]


def policy_versions(session: Session, dataset: Dataset) -> list[Policy]:
    return list(session.scalars(select(Policy).where(Policy.dataset_id == dataset.id)
                                .order_by(Policy.version.desc())))


def policy_view(session: Session, policy: Policy) -> dict[str, Any]:
    """A policy version rendered: every field of the document, and the YAML as written."""
    doc = document(policy)
    names = user_names(session, {u for u in (policy.created_by, policy.approved_by) if u})
    return {"version": policy.version, "status": policy.status, "yaml": policy.body_yaml,
            "created_at": policy.created_at, "approved_at": policy.approved_at,
            "created_by": names.get(policy.created_by, ""),
            "approved_by": names.get(policy.approved_by or "", ""), "doc": doc,
            "classification": [(level, LEVELS[level], [u.value for u in doc.uses_for(level)])
                               for level in LEVELS]}


def dataset_overview(session: Session, dataset: Dataset) -> dict[str, Any]:
    """One line of the owner's dataset list."""
    policy = policy_in_force(session, dataset.id)
    latest = session.scalar(select(func.max(DatasetVersion.version)).where(
        DatasetVersion.dataset_id == dataset.id))
    budget = ledger.summary(session, dataset.id, document(policy).budget if policy else None,
                            None)
    waiting = session.scalar(select(func.count()).select_from(Job).where(
        Job.dataset_id == dataset.id, Job.status == JobStatus.PENDING_REVIEW.value)) or 0
    return {"name": dataset.name, "title": dataset.title, "latest_version": latest,
            "policy_version": policy.version if policy else None, "budget": budget,
            "pending_review": waiting}


def release_view(session: Session, principal: Principal, job: Job,
                 signer: Signer) -> ReleaseInfo | None:
    """``outputs.release_info`` with the releasing reviewer named by ``actor_labels``."""
    return release_info(session, job, signer,
                        lambda uid: actor_labels(session, principal, {uid}).get(uid, "?"))
