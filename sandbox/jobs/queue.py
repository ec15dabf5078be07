"""The job queue: a database table with leases and fencing tokens.

Contract:
- ``claim`` hands a queued job to one worker with a lease (``lease_expires_at``) and a new
  fencing token (``lease_token``). On PostgreSQL rows are claimed with
  ``FOR UPDATE SKIP LOCKED``; on SQLite the ``BEGIN IMMEDIATE`` transaction serialises it.
- Before claiming, expired leases are reaped: the job goes back to the queue, or to
  ``failed`` once it has used ``max_attempts``.
- Every later write by a worker (``heartbeat``, ``fenced``) presents its token; a worker
  whose lease was taken over gets ``LeaseLost`` and its late result is rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.db import Database
from sandbox.db.models import Job, as_utc, utcnow
from sandbox.jobs.states import JobStatus, transition

#: Why a job failed is not told when the failure may depend on the data (a worker crash
#: can): this is the same wording as any data-dependent failure, plus the state.
DEAD_LETTER_MESSAGE = ("the query could not be answered on the data; its budget stays "
                       "charged (data-dependent failures are not described); dead-lettered")


class LeaseLost(Exception):
    """The worker no longer holds the job's lease; it must drop its result."""


@dataclass(frozen=True)
class Claim:
    job_id: str
    token: int
    attempt: int


def reap_expired(session: Session, *, max_attempts: int) -> int:
    """Requeue (or fail, after ``max_attempts``) running jobs whose lease has expired."""
    now = utcnow()
    count = 0
    for job in session.scalars(select(Job).where(Job.status == JobStatus.RUNNING.value)):
        expires = as_utc(job.lease_expires_at)
        if expires is None or expires > now:
            continue
        job.lease_owner, job.lease_expires_at = None, None
        job.lease_token += 1  # fence off the old holder
        if job.attempts >= max_attempts:
            job.error_public = DEAD_LETTER_MESSAGE
            transition(session, job, JobStatus.FAILED, actor="system", actor_id=None,
                       detail={"reason": "dead-lettered"})
        else:
            transition(session, job, JobStatus.QUEUED, actor="system", actor_id=None)
        count += 1
    return count


def claim(db: Database, worker_id: str, *, lease_seconds: float, max_attempts: int) -> Claim | None:
    """Take the oldest queued job, or return ``None`` if there is none."""
    with db.transaction() as session:
        reap_expired(session, max_attempts=max_attempts)
        query = (select(Job).where(Job.status == JobStatus.QUEUED.value)
                 .order_by(Job.created_at).limit(1))
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        job = session.scalar(query)
        if job is None:
            return None
        job.attempts += 1
        job.lease_token += 1
        job.lease_owner = worker_id
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
        transition(session, job, JobStatus.RUNNING, actor="worker", actor_id=None,
                   detail={"worker": worker_id, "attempt": job.attempts})
        return Claim(job.id, job.lease_token, job.attempts)


def locked_job(session: Session, claim_: Claim) -> Job:
    """The claimed job, row-locked, if the claim still holds; else ``LeaseLost``."""
    job = session.scalar(select(Job).where(Job.id == claim_.job_id).with_for_update())
    if job is None or job.status != JobStatus.RUNNING.value or job.lease_token != claim_.token:
        raise LeaseLost(f"lease on job {claim_.job_id} was lost")
    return job


@contextmanager
def fenced(db: Database, claim_: Claim) -> Iterator[tuple[Session, Job]]:
    """A transaction in which the claim is verified first; see ``locked_job``."""
    with db.transaction() as session:
        yield session, locked_job(session, claim_)


def heartbeat(db: Database, claim_: Claim, *, lease_seconds: float) -> None:
    """Extend the lease; raises ``LeaseLost`` if it was taken over."""
    with fenced(db, claim_) as (_session, job):
        job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
