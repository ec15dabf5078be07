"""Reviewer pages: the review queue, one job under review (its code or query, outputs,
the checks' findings, budget, approvals so far, release and signature), and the approve
and reject forms.

Reading needs the reviewer role and goes through ``ownership.job_for`` (the API's
``visible_job``: jobs of other organisations only; 404 otherwise). The decisions call the
API's own endpoint functions (``sandbox.api.routers.reviews``), so the rules (no review
of one's own organisation's job, the two-person rule, one approval per reviewer, only
``pending_review`` jobs), the job's move, the rejection message the analyst sees, the
release and its audit events are exactly the API's.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Path, Request
from pydantic import ValidationError
from sqlalchemy import select
from starlette.responses import RedirectResponse, Response

from sandbox.api.deps import RuntimeDep, require_role
from sandbox.api.ownership import job_for
from sandbox.api.routers import reviews as reviews_api
from sandbox.db.models import JobResult, Review
from sandbox.errors import Conflict, Invalid
from sandbox.identity.service import Principal, Role
from sandbox.jobs.states import JobStatus
from sandbox.review.service import review_queue
from sandbox.runtime import Runtime
from sandbox.web import views
from sandbox.web.deps import CsrfPrincipal, WebPrincipal
from sandbox.web.diagram import moves_from, state_svg
from sandbox.web.outputs import render
from sandbox.web.templating import page

router = APIRouter(prefix="/ui/reviews", include_in_schema=False)
JobId = Annotated[str, Path(max_length=64)]
DONE = {"approved": "Approved: the output is released and signed.",
        "recorded": "Your approval is recorded; another reviewer must also approve.",
        "rejected": "Rejected: the analyst sees your reason; nothing was released."}


@router.get("")
def queue(request: Request, runtime: RuntimeDep, principal: WebPrincipal) -> Response:
    """Jobs waiting for this reviewer, oldest first."""
    require_role(principal, Role.REVIEWER)
    with runtime.db.read() as session:
        waiting = views.job_rows(session, review_queue(session, principal))
    return page(request, "reviews.html", title="Review queue", jobs=waiting)


def _context(runtime: Runtime, principal: Principal, job_id: str) -> dict[str, Any]:
    with runtime.db.read() as session:
        job = job_for(session, principal, job_id)
        result = session.get(JobResult, job.id)
        mine = session.scalar(select(Review.decision).where(
            Review.job_id == job.id, Review.reviewer_id == principal.user_id,
            Review.decision == "approved"))
        return {"job": views.job_summary(session, job), "spec": job.spec,
                "output": render(result.content if result else None),
                "sha256": result.content_sha256 if result else None,
                "events": views.timeline(session, principal, job),
                "release": views.release_view(session, principal, job, runtime.signer),
                "approved_by_me": mine is not None,
                "decidable": job.status == JobStatus.PENDING_REVIEW.value,
                "diagram": state_svg(job.status), "moves": moves_from(job.status)}


@router.get("/{job_id}")
def review(request: Request, job_id: JobId, runtime: RuntimeDep, principal: WebPrincipal,
           done: str | None = None) -> Response:
    """One job as the reviewer must see it, with the decision forms while it waits."""
    require_role(principal, Role.REVIEWER)
    context = _context(runtime, principal, job_id)
    return page(request, "review.html", title=f"Review job {job_id[:12]}",
                flash=DONE.get(done or ""), **context)


def _refused(request: Request, runtime: RuntimeDep, principal: Principal, job_id: str,
             status_code: int, message: str, reason: str = "") -> Response:
    context = _context(runtime, principal, job_id)
    return page(request, "review.html", status_code=status_code,
                title=f"Review job {job_id[:12]}", error=message, reason=reason, **context)


@router.post("/{job_id}/approve")
def approve(request: Request, job_id: JobId, runtime: RuntimeDep,
            principal: CsrfPrincipal) -> Response:
    """``POST /v1/reviews/{job_id}/approve``, from a form. 403 and 404 are the API's
    error pages; a refusal that fits the state (409) is shown on the review page."""
    try:
        answer = reviews_api.approve(job_id, runtime, principal)
    except (Conflict, Invalid) as exc:
        return _refused(request, runtime, principal, job_id, exc.status_code, str(exc))
    done = "approved" if answer.get("release") else "recorded"
    return RedirectResponse(f"/ui/reviews/{quote(job_id)}?done={done}", status_code=303)


@router.post("/{job_id}/reject")
def reject(request: Request, job_id: JobId, runtime: RuntimeDep, principal: CsrfPrincipal,
           reason: Annotated[str, Form(max_length=10_000)] = "") -> Response:
    """``POST /v1/reviews/{job_id}/reject`` with the form's reason (1 to 4000
    characters, shown to the analyst)."""
    try:
        body = reviews_api.Rejection(reason=reason.strip())
    except ValidationError:
        require_role(principal, Role.REVIEWER)
        return _refused(request, runtime, principal, job_id, 422,
                        "A rejection needs a reason of 1 to 4000 characters; the analyst "
                        "sees it.", reason=reason)
    try:
        reviews_api.reject(job_id, body, runtime, principal)
    except (Conflict, Invalid) as exc:
        return _refused(request, runtime, principal, job_id, exc.status_code, str(exc),
                        reason=reason)
    return RedirectResponse(f"/ui/reviews/{quote(job_id)}?done=rejected", status_code=303)
