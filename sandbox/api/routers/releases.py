"""Releases: the signed artifact of a released job, and the public key to check it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from sqlalchemy import select

from sandbox.api.deps import PrincipalDep, RuntimeDep
from sandbox.db.models import Release
from sandbox.errors import NotFound
from sandbox.jobs import service as jobs
from sandbox.jobs.states import JobStatus

router = APIRouter(prefix="/v1/releases", tags=["releases"])


@router.get("/public-key", summary="The Ed25519 public key that signs releases (no token)")
def public_key(request: Request) -> dict[str, Any]:
    signer = request.app.state.runtime.signer
    return {"algorithm": "Ed25519", "key_id": signer.key_id, "pem": signer.public_pem()}


@router.get("/{job_id}", summary="A released job's signed artifact")
def artifact(job_id: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    """``sandbox release verify FILE`` checks a saved copy against the public key."""
    with runtime.db.read() as session:
        job = jobs.visible_job(session, principal, job_id)
        release = session.scalar(select(Release).where(Release.job_id == job.id))
        if job.status != JobStatus.RELEASED.value or release is None or not release.artifact:
            raise NotFound(f"job {job_id!r} has no release")
        result: dict[str, Any] = release.artifact
        return result
