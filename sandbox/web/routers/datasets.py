"""Owner pages: the organisation's datasets, one dataset (metadata, schema with
classification, versions, policy, budget, jobs), and one policy version (rendered and as
YAML) with its approval form when it is a draft.

Every page needs the owner role (``require_role``, 403) and reaches a dataset only
through ``ownership.owned_dataset`` (404 for another organisation's). Approving a draft
calls the API's own endpoint function, so it is checked and audited exactly as
``POST /v1/datasets/{name}/policies/{version}/approve``.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Path, Request
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.responses import RedirectResponse, Response

from sandbox.api.deps import RuntimeDep, require_role
from sandbox.api.ownership import owned_dataset, owned_jobs_query
from sandbox.api.routers import policies as policies_api
from sandbox.datasets import catalog
from sandbox.db.models import Dataset, Job, Policy
from sandbox.errors import Conflict, Invalid, NotFound
from sandbox.identity.service import Role
from sandbox.policies.service import document, policy_in_force
from sandbox.web import views
from sandbox.web.deps import CsrfPrincipal, WebPrincipal
from sandbox.web.templating import page

router = APIRouter(prefix="/ui/datasets", include_in_schema=False)
MAX_VERSION = 2**31 - 1
Name = Annotated[str, Path(max_length=64)]
Version = Annotated[int, Path(ge=1, le=MAX_VERSION)]


@router.get("")
def datasets(request: Request, runtime: RuntimeDep, principal: WebPrincipal) -> Response:
    """The datasets of the owner's organisation, with policy, budget and waiting jobs."""
    require_role(principal, Role.OWNER)
    with runtime.db.read() as session:
        rows = session.scalars(select(Dataset).where(
            Dataset.owner_org_id == principal.org_id, Dataset.deleted_at.is_(None))
            .order_by(Dataset.name))
        overview = [views.dataset_overview(session, d) for d in rows]
    return page(request, "datasets.html", title="Your datasets", datasets=overview)


@router.get("/{name}")
def dataset(request: Request, name: Name, runtime: RuntimeDep,
            principal: WebPrincipal) -> Response:
    """Metadata, schema, versions, policy in force, budget and recent jobs of a dataset."""
    require_role(principal, Role.OWNER)
    with runtime.db.read() as session:
        ds = owned_dataset(session, principal, name)
        schema = catalog.schema_of(catalog.latest_version(session, ds))
        policy = policy_in_force(session, ds.id)
        doc = document(policy) if policy else None
        recent = list(session.scalars(owned_jobs_query(principal).where(
            Job.dataset_id == ds.id).order_by(Job.created_at.desc()).limit(50)))
        context: dict[str, Any] = {
            "dataset": ds, "schema": schema, "columns": views.schema_columns(schema, doc),
            "versions": views.versions(session, ds),
            "policy": views.policy_view(session, policy) if policy else None,
            "policies": views.policy_versions(session, ds),
            "budget": views.budget_view(session, ds, policy),
            "jobs": views.job_rows(session, recent)}
    return page(request, "dataset.html", title=f"Dataset {name}", **context)


def _policy(session: Session, dataset: Dataset, version: int) -> Policy:
    policy = session.scalar(select(Policy).where(Policy.dataset_id == dataset.id,
                                                 Policy.version == version))
    if policy is None:
        raise NotFound(f"policy version {version} of {dataset.name!r} not found")
    return policy


@router.get("/{name}/policies/{version}")
def policy(request: Request, name: Name, version: Version, runtime: RuntimeDep,
           principal: WebPrincipal, done: str | None = None) -> Response:
    """One policy version: every rule rendered, the YAML as written, and for a draft the
    form that puts it in force."""
    require_role(principal, Role.OWNER)
    with runtime.db.read() as session:
        ds = owned_dataset(session, principal, name)
        view = views.policy_view(session, _policy(session, ds, version))
        others = views.policy_versions(session, ds)
    flash = "This version is now the policy in force." if done == "approved" else None
    return page(request, "policy.html", title=f"Policy v{version} of {name}", dataset=ds,
                policy=view, policies=others, flash=flash)


@router.post("/{name}/policies/{version}/approve")
def approve_policy(request: Request, name: Name, version: Version, runtime: RuntimeDep,
                   principal: CsrfPrincipal) -> Response:
    """Put a draft in force through the API's endpoint (same checks, same audit event)."""
    require_role(principal, Role.OWNER)
    with runtime.db.transaction() as session:
        owned_dataset(session, principal, name)
    try:
        policies_api.approve_policy(name, version, runtime, principal)
    except (Conflict, Invalid) as exc:
        with runtime.db.transaction() as session:
            ds = owned_dataset(session, principal, name)
            view = views.policy_view(session, _policy(session, ds, version))
            others = views.policy_versions(session, ds)
        return page(request, "policy.html", status_code=exc.status_code,
                    title=f"Policy v{version} of {name}", dataset=ds, policy=view,
                    policies=others, error=str(exc))
    return RedirectResponse(f"/ui/datasets/{quote(name)}/policies/{version}?done=approved",
                            status_code=303)
