"""Job states, who may move a job between them, and the audit event each move writes.

The table ``TRANSITIONS`` is the single source of truth: services call
``check_transition`` (raises) or ``can_transition`` (asks), and ``docs/explanation``
draws the state diagram from it (``sandbox.jobs.diagram``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.db.models import Job, utcnow
from sandbox.errors import Conflict


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    PENDING_REVIEW = "pending_review"
    RELEASED = "released"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.RELEASED, JobStatus.REJECTED, JobStatus.FAILED,
                      JobStatus.CANCELLED})


@dataclass(frozen=True)
class Transition:
    actors: frozenset[str]  # roles, or "worker" / "system" for the machinery
    event: str


def _t(actors: set[str], event: str) -> Transition:
    return Transition(frozenset(actors), event)


S = JobStatus
TRANSITIONS: dict[tuple[JobStatus, JobStatus], Transition] = {
    (S.QUEUED, S.RUNNING): _t({"worker"}, "job.started"),
    (S.QUEUED, S.CANCELLED): _t({"analyst"}, "job.cancelled"),
    (S.RUNNING, S.PENDING_REVIEW): _t({"worker"}, "job.completed"),
    (S.RUNNING, S.RELEASED): _t({"worker"}, "job.auto_released"),
    (S.RUNNING, S.FAILED): _t({"worker", "system"}, "job.failed"),
    (S.RUNNING, S.QUEUED): _t({"system"}, "job.lease_expired"),
    (S.RUNNING, S.CANCELLED): _t({"analyst"}, "job.cancelled"),
    (S.PENDING_REVIEW, S.RELEASED): _t({"reviewer"}, "job.released"),
    (S.PENDING_REVIEW, S.REJECTED): _t({"reviewer"}, "job.rejected"),
    (S.PENDING_REVIEW, S.CANCELLED): _t({"analyst"}, "job.cancelled"),
}


class TransitionError(Conflict):
    """A move the table does not allow for this actor."""


def can_transition(current: str, target: JobStatus, actor: str) -> bool:
    rule = TRANSITIONS.get((JobStatus(current), target))
    return rule is not None and actor in rule.actors


def check_transition(current: str, target: JobStatus, actor: str) -> Transition:
    rule = TRANSITIONS.get((JobStatus(current), target))
    if rule is None:
        raise TransitionError(f"a {current} job cannot become {target.value}")
    if actor not in rule.actors:
        raise TransitionError(f"a {actor} cannot move a job from {current} to {target.value}")
    return rule


def transition(session: Session, job: Job, target: JobStatus, *, actor: str,
               actor_id: str | None, detail: dict[str, object] | None = None) -> None:
    """Move ``job`` to ``target`` and write the table's audit event in the same transaction."""
    rule = check_transition(job.status, target, actor)
    previous = job.status
    job.status = target.value
    job.updated_at = utcnow()
    if target in TERMINAL:
        job.finished_at = job.updated_at
    session.flush()
    record(session, actor_id=actor_id, action=rule.event, object_type="job", object_id=job.id,
           detail={"from": previous, "to": target.value, **(detail or {})})
