"""Drafting, approving and looking up policies.

A dataset's policies are numbered versions. ``submit_draft`` adds a draft; ``approve``
makes it the one in force and supersedes the previous approved version. Jobs pin the
policy in force when they were submitted. Each change writes its audit event in the same
transaction.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.db.models import Dataset, Policy, utcnow
from sandbox.errors import Conflict
from sandbox.policies.model import PolicyDocument, PolicyError


class PolicyStateError(Conflict):
    """An approval or lookup that the policy's state does not allow."""


def submit_draft(session: Session, dataset: Dataset, body_yaml: str, *,
                 actor_id: str) -> Policy:
    """Validate ``body_yaml`` and store it as the next draft version of the dataset's policy."""
    doc = PolicyDocument.from_yaml(body_yaml)
    if doc.dataset != dataset.name:
        raise PolicyError(f"policy.dataset: names {doc.dataset!r} but is submitted for "
                          f"{dataset.name!r}")
    latest = session.scalar(select(func.max(Policy.version))
                            .where(Policy.dataset_id == dataset.id)) or 0
    policy = Policy(dataset_id=dataset.id, version=latest + 1, body_yaml=body_yaml,
                    body=doc.model_dump(mode="json"), status="draft", created_by=actor_id)
    session.add(policy)
    session.flush()
    record(session, actor_id=actor_id, action="policy.drafted", object_type="policy",
           object_id=policy.id, detail={"dataset": dataset.name, "version": policy.version})
    return policy


def approve(session: Session, policy: Policy, *, actor_id: str) -> Policy:
    """Put a draft in force; the previously approved version becomes superseded."""
    if policy.status != "draft":
        raise PolicyStateError(f"policy version {policy.version} is {policy.status}, not draft")
    for previous in session.scalars(select(Policy).where(
            Policy.dataset_id == policy.dataset_id, Policy.status == "approved")):
        previous.status = "superseded"
    policy.status = "approved"
    policy.approved_by = actor_id
    policy.approved_at = utcnow()
    session.flush()
    record(session, actor_id=actor_id, action="policy.approved", object_type="policy",
           object_id=policy.id, detail={"version": policy.version})
    return policy


def policy_in_force(session: Session, dataset_id: str) -> Policy | None:
    """The approved policy of a dataset, or ``None`` (then every query is refused)."""
    return session.scalar(select(Policy).where(Policy.dataset_id == dataset_id,
                                               Policy.status == "approved"))


def document(policy: Policy) -> PolicyDocument:
    return PolicyDocument.model_validate(policy.body)
