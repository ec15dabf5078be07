"""Reviews: the reviewer's queue, the output under review, approve and reject."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from sandbox.api.deps import PrincipalDep, RuntimeDep, require_role
from sandbox.db.models import Job, JobResult, Policy
from sandbox.errors import Forbidden
from sandbox.identity.service import Principal, Role
from sandbox.jobs import service as jobs
from sandbox.policies.service import document
from sandbox.review import service

router = APIRouter(prefix="/v1/reviews", tags=["reviews"])


class Rejection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=4000)


@router.get("", summary="Jobs waiting for your review")
def queue(runtime: RuntimeDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    require_role(principal, Role.REVIEWER)
    with runtime.db.read() as session:
        return [jobs.job_view(j) for j in service.review_queue(session, principal)]


@router.get("/{job_id}", summary="A job under review: its query, cost and output")
def detail(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    require_role(principal, Role.REVIEWER)
    with runtime.db.read() as session:
        job = jobs.visible_job(session, principal, job_id)
        result = session.get(JobResult, job.id)
        return {"job": jobs.job_view(job), "output": result.content if result else None,
                "sha256": result.content_sha256 if result else None}


def _reviewable(session: Session, principal: Principal, job_id: str) -> Job:
    """The job to decide on: 403 for a job of the reviewer's own organisation (a forbidden
    action, audited), 404 for a missing one."""
    job = session.get(Job, job_id)
    if job is not None and job.org_id == principal.org_id:
        raise Forbidden("reviewers may not review jobs of their own organisation")
    return jobs.visible_job(session, principal, job_id)


@router.post("/{job_id}/approve", summary="Approve and release the output")
def approve(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    require_role(principal, Role.REVIEWER)
    with runtime.db.transaction() as session:
        job = _reviewable(session, principal, job_id)
        policy = session.get(Policy, job.policy_id)
        required = document(policy).approvals if policy else 1
        release = service.approve(session, principal, job, signer=runtime.signer,
                                  approvals_required=required)
        if release is None:
            return {"job": jobs.job_view(job), "release": None,
                    "note": f"approval recorded; {required} distinct reviewers must approve"}
        return {"job": jobs.job_view(job), "release": {"id": release.id,
                                                        "sha256": release.content_sha256,
                                                        "key_id": release.key_id}}


@router.post("/{job_id}/reject", summary="Reject the output with a reason the analyst sees")
def reject(job_id: str, body: Rejection, runtime: RuntimeDep,
           principal: PrincipalDep) -> dict[str, Any]:
    require_role(principal, Role.REVIEWER)
    with runtime.db.transaction() as session:
        job = _reviewable(session, principal, job_id)
        service.reject(session, principal, job, body.reason)
        return jobs.job_view(job)
