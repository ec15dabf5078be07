"""Approving and rejecting jobs' outputs; creating releases bound to their content hash.

A reviewer never reviews a job of their own organisation. A release records the SHA-256
of the exact content approved; the analyst can download only released content, and only
if it still has that hash.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.db.models import Job, JobResult, Release, Review, utcnow
from sandbox.errors import Conflict, Forbidden, NotFound
from sandbox.identity.service import Principal, Role
from sandbox.jobs.states import JobStatus, transition
from sandbox.review.signing import Signer, canonical


def content_digest(content: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(content)).hexdigest()


def check_can_review(principal: Principal, job: Job) -> None:
    if principal.role != Role.REVIEWER:
        raise Forbidden("only reviewers approve or reject outputs")
    if job.org_id == principal.org_id:
        raise Forbidden("reviewers may not review jobs of their own organisation")


def create_release(session: Session, job: Job, *, released_by: str | None,
                   signer: Signer) -> Release:
    """Bind the release to the approved content's hash and sign it (Ed25519)."""
    result = session.get(JobResult, job.id)
    if result is None:
        raise NotFound(f"job {job.id!r} has no output")
    payload = {"job_id": job.id, "dataset_id": job.dataset_id,
               "dataset_version": job.dataset_version, "sha256": result.content_sha256,
               "content": result.content, "released_at": utcnow().isoformat(),
               "released_by": released_by}
    artifact = signer.sign(payload)
    release = Release(job_id=job.id, content_sha256=result.content_sha256,
                      released_by=released_by, artifact=artifact, key_id=signer.key_id)
    session.add(release)
    session.flush()
    record(session, actor_id=released_by, action="release.signed", object_type="job",
           object_id=job.id, detail={"sha256": result.content_sha256,
                                     "key_id": signer.key_id})
    return release


def approve(session: Session, principal: Principal, job: Job, *, signer: Signer,
            approvals_required: int = 1) -> Release | None:
    """Record the approval; release once ``approvals_required`` distinct reviewers have
    approved (the two-person rule when it is 2). ``None`` while more are needed."""
    check_can_review(principal, job)
    if job.status != JobStatus.PENDING_REVIEW.value:
        raise Conflict(f"job is {job.status}, not waiting for review")
    approvers = set(session.scalars(select(Review.reviewer_id).where(
        Review.job_id == job.id, Review.decision == "approved")))
    if principal.user_id in approvers:
        raise Conflict("you have already approved this job; another reviewer must approve")
    session.add(Review(job_id=job.id, reviewer_id=principal.user_id, decision="approved"))
    session.flush()
    record(session, actor_id=principal.user_id, action="review.approved", object_type="job",
           object_id=job.id, detail={"approvals": len(approvers) + 1,
                                     "required": approvals_required})
    if len(approvers) + 1 < approvals_required:
        return None
    transition(session, job, JobStatus.RELEASED, actor="reviewer", actor_id=principal.user_id)
    return create_release(session, job, released_by=principal.user_id, signer=signer)


def reject(session: Session, principal: Principal, job: Job, reason: str) -> None:
    """Reject ``job``; the analyst sees the reason as the job's public error."""
    check_can_review(principal, job)
    session.add(Review(job_id=job.id, reviewer_id=principal.user_id, decision="rejected",
                       reason=reason))
    job.error_public = f"rejected by review: {reason}"
    transition(session, job, JobStatus.REJECTED, actor="reviewer", actor_id=principal.user_id,
               detail={"reason": reason})


def released_content(session: Session, job: Job) -> dict[str, Any]:
    """The released output of ``job``; ``NotFound`` unless released and unchanged."""
    release = session.scalar(select(Release).where(Release.job_id == job.id))
    result = session.get(JobResult, job.id)
    if (job.status != JobStatus.RELEASED.value or release is None or result is None
            or content_digest(result.content) != release.content_sha256):
        raise NotFound(f"job {job.id!r} has no released output")
    return {"job_id": job.id, "sha256": release.content_sha256, **result.content}


def review_queue(session: Session, principal: Principal) -> list[Job]:
    """Jobs waiting for review that this reviewer may review."""
    if principal.role != Role.REVIEWER:
        raise Forbidden("only reviewers have a review queue")
    return list(session.scalars(select(Job).where(
        Job.status == JobStatus.PENDING_REVIEW.value, Job.org_id != principal.org_id)
        .order_by(Job.created_at)))
