"""Job pages: the jobs the signed-in user may see, and one job's state.

Listing and reading go through ``ownership.jobs_query_for`` and ``ownership.job_for``
(the API's visibility rule; owners also see the jobs on their datasets). These pages
show a job's state in the state machine, its history and its cost, never its output:
reviewers read outputs on the review page.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from sqlalchemy import select
from starlette.responses import Response

from sandbox.api.deps import RuntimeDep
from sandbox.api.ownership import job_for, jobs_query_for
from sandbox.db.models import Dataset, Job
from sandbox.jobs.states import JobStatus
from sandbox.web import views
from sandbox.web.deps import WebPrincipal
from sandbox.web.diagram import moves_from, state_svg
from sandbox.web.templating import page

router = APIRouter(prefix="/ui/jobs", include_in_schema=False)
PAGE = 100
JobId = Annotated[str, Path(max_length=64)]


@router.get("")
def jobs(request: Request, runtime: RuntimeDep, principal: WebPrincipal,
         status: Annotated[JobStatus | None, Query()] = None,
         dataset: Annotated[str | None, Query(max_length=64)] = None,
         offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> Response:
    """Jobs you may see, newest first, optionally of one state or one dataset."""
    query = jobs_query_for(principal)
    if status is not None:
        query = query.where(Job.status == status.value)
    if dataset:
        query = query.where(Job.dataset_id.in_(select(Dataset.id).where(
            Dataset.name == dataset)))
    with runtime.db.read() as session:
        rows = list(session.scalars(query.order_by(Job.created_at.desc())
                                    .limit(PAGE + 1).offset(offset)))
        lines = views.job_rows(session, rows[:PAGE])
    return page(request, "jobs.html", title="Jobs", jobs=lines, status=status.value
                if status else "", dataset=dataset or "", offset=offset,
                more=len(rows) > PAGE, page_size=PAGE,
                statuses=[s.value for s in JobStatus])


@router.get("/{job_id}")
def job(request: Request, job_id: JobId, runtime: RuntimeDep,
        principal: WebPrincipal) -> Response:
    """One job: its state in the machine, where it can go next, history, cost."""
    with runtime.db.read() as session:
        found = job_for(session, principal, job_id)
        context: dict[str, Any] = {"job": views.job_summary(session, found),
                   "events": views.timeline(session, principal, found),
                   "release": views.release_view(session, principal, found,
                                                 runtime.signer)}
    return page(request, "job.html", title=f"Job {job_id[:12]}",
                diagram=state_svg(found.status), moves=moves_from(found.status), **context)
