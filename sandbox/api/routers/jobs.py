"""Jobs: submit (analyst, with ``Idempotency-Key``), status, cancel, released result."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query

from sandbox.api.deps import PrincipalDep, RuntimeDep, require_role
from sandbox.db.models import Job
from sandbox.identity.service import Role
from sandbox.jobs import service
from sandbox.review.service import released_content

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, summary="Submit a job: a query spec, DP-SQL or a script "
             "(analyst)")
def submit_job(body: service.JobRequest, runtime: RuntimeDep, principal: PrincipalDep,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None
               ) -> dict[str, Any]:
    require_role(principal, Role.ANALYST)
    with runtime.db.transaction() as session:
        if idempotency_key is None or not service.has_key(session, principal, idempotency_key):
            service.check_quota(session, principal,
                                per_minute=runtime.settings.submissions_per_minute,
                                pending=runtime.settings.max_pending_jobs)
        job = service.submit_query_job(session, principal, body,
                                       idempotency_key=idempotency_key)
        return service.job_view(job)


@router.get("", summary="Jobs you may see: your organisation's (analyst), others' "
                        "(reviewer), all (admin); newest first")
def list_jobs(runtime: RuntimeDep, principal: PrincipalDep,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> list[dict[str, Any]]:
    with runtime.db.read() as session:
        query = service.visible_jobs_query(principal).order_by(Job.created_at.desc())
        rows = session.scalars(query.limit(limit).offset(offset)).all()
        return [service.job_view(j) for j in rows]


@router.get("/{job_id}", summary="A job's status")
def get_job(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.read() as session:
        return service.job_view(service.visible_job(session, principal, job_id))


@router.post("/{job_id}/cancel", summary="Cancel a job (its budget charge stays)")
def cancel_job(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        job = service.visible_job(session, principal, job_id)
        return service.job_view(service.cancel(session, principal, job))


@router.get("/{job_id}/result", summary="The released output of a job")
def get_result(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.read() as session:
        job = service.visible_job(session, principal, job_id)
        return released_content(session, job)
