"""The audit page: recent events, the chain head, and (on request) a full verification.

Admins see every event. Owners see the events about their organisation's datasets,
those datasets' policies, and the jobs on them (the objects ``sandbox.api.ownership``
gives them). Other roles get the role's 403. The chain head and the verification are
about the whole log, whoever asks; they reveal no event.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import and_, or_, select, true
from starlette.responses import Response

from sandbox.api.deps import RuntimeDep, require_role
from sandbox.api.ownership import owned_jobs_query
from sandbox.audit import verify
from sandbox.db.models import AuditEvent, Dataset, Job, Policy
from sandbox.identity.service import Principal, Role
from sandbox.web import views
from sandbox.web.deps import WebPrincipal
from sandbox.web.templating import page

router = APIRouter(prefix="/ui/audit", include_in_schema=False)
PAGE = 200


def _scope(principal: Principal) -> Any:
    """The events ``principal`` may read, as a WHERE clause."""
    if principal.role == Role.ADMIN:
        return true()
    datasets = select(Dataset.id).where(Dataset.owner_org_id == principal.org_id)
    policies = select(Policy.id).where(Policy.dataset_id.in_(datasets))
    jobs = owned_jobs_query(principal).with_only_columns(Job.id)
    return or_(and_(AuditEvent.object_type == "dataset", AuditEvent.object_id.in_(datasets)),
               and_(AuditEvent.object_type == "policy", AuditEvent.object_id.in_(policies)),
               and_(AuditEvent.object_type == "job", AuditEvent.object_id.in_(jobs)))


@router.get("")
def audit(request: Request, runtime: RuntimeDep, principal: WebPrincipal,
          before: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
          check: Annotated[bool, Query(alias="verify")] = False) -> Response:
    """Newest events first, ``PAGE`` at a time (``before`` pages back); ``verify=1``
    walks the whole chain."""
    if principal.role != Role.ADMIN:
        require_role(principal, Role.OWNER)
    query = select(AuditEvent).where(_scope(principal))
    if before is not None:
        query = query.where(AuditEvent.seq < before)
    with runtime.db.read() as session:
        events = list(session.scalars(query.order_by(AuditEvent.seq.desc()).limit(PAGE + 1)))
        head = session.execute(select(AuditEvent.seq, AuditEvent.hash)
                               .order_by(AuditEvent.seq.desc()).limit(1)).first()
        result = verify(session) if check else None
        names = views.actor_labels(session, principal,
                                   {e.actor_id for e in events if e.actor_id})
    rows = [{"seq": e.seq, "at": e.at, "action": e.action, "object_type": e.object_type,
             "object_id": e.object_id, "actor": names.get(e.actor_id, e.actor_id)
             if e.actor_id else "system", "detail": e.detail} for e in events[:PAGE]]
    return page(request, "audit.html", title="Audit log", events=rows,
                head={"seq": head[0], "hash": head[1]} if head else None,
                verification=result, more=len(events) > PAGE,
                next_before=rows[-1]["seq"] if rows else None,
                scope="every event" if principal.role == Role.ADMIN else
                "events about your organisation's datasets, their policies and their jobs")
