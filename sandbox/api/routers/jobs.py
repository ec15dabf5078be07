"""Jobs: submit (analyst, with ``Idempotency-Key``), status, cancel, released result."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header
from sqlalchemy import select

from sandbox.api.deps import PrincipalDep, RuntimeDep, require_role
from sandbox.db.models import Job
from sandbox.identity.service import Role
from sandbox.jobs import service
from sandbox.review.service import released_content

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, summary="Submit a query job (analyst)")
def submit_job(body: service.JobRequest, runtime: RuntimeDep, principal: PrincipalDep,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None
               ) -> dict[str, Any]:
    require_role(principal, Role.ANALYST)
    with runtime.db.transaction() as session:
        job = service.submit_query_job(session, principal, body,
                                       idempotency_key=idempotency_key)
        return service.job_view(job)


@router.get("", summary="Jobs of your organisation (analyst) or all (admin)")
def list_jobs(runtime: RuntimeDep, principal: PrincipalDep) -> list[dict[str, Any]]:
    with runtime.db.transaction() as session:
        rows = session.scalars(select(Job).order_by(Job.created_at.desc()).limit(200))
        return [service.job_view(j) for j in rows if service.can_see_job(principal, j)]


@router.get("/{job_id}", summary="A job's status")
def get_job(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        return service.job_view(service.visible_job(session, principal, job_id))


@router.post("/{job_id}/cancel", summary="Cancel a job (its budget charge stays)")
def cancel_job(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        job = service.visible_job(session, principal, job_id)
        return service.job_view(service.cancel(session, principal, job))


@router.get("/{job_id}/result", summary="The released output of a job")
def get_result(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        job = service.visible_job(session, principal, job_id)
        return released_content(session, job)
