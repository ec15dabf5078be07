"""Signing in and out, and the home page.

``POST /ui/login`` takes an API token once, checks it with ``authenticate`` (the API's
gate) and sets the session cookie (``sandbox.web.session``); the token itself is neither
stored nor echoed. ``POST /ui/logout`` ends the session. Both write an audit event.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from sqlalchemy import func, select
from starlette.responses import RedirectResponse, Response

from sandbox.api.deps import RuntimeDep
from sandbox.api.ownership import owned_jobs_query
from sandbox.audit import record
from sandbox.db.models import ApiToken, Dataset, Job, Organisation
from sandbox.identity.service import Role, authenticate, hash_token
from sandbox.jobs.states import JobStatus
from sandbox.review.service import review_queue
from sandbox.web.deps import (
    CsrfPrincipal,
    SignInRequired,
    WebPrincipal,
    keeper_of,
    safe_next,
    web_principal,
)
from sandbox.web.templating import page

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("")
def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/")
def home(request: Request, runtime: RuntimeDep, principal: WebPrincipal) -> Response:
    """What the signed-in user can do here, by role."""
    facts: dict[str, int] = {}
    with runtime.db.read() as session:
        org = session.get(Organisation, principal.org_id)
        if principal.role == Role.OWNER:
            facts["datasets"] = session.scalar(select(func.count()).select_from(Dataset).where(
                Dataset.owner_org_id == principal.org_id, Dataset.deleted_at.is_(None))) or 0
            waiting = owned_jobs_query(principal).where(
                Job.status == JobStatus.PENDING_REVIEW.value).subquery()
            facts["pending_review"] = session.scalar(
                select(func.count()).select_from(waiting)) or 0
        elif principal.role == Role.REVIEWER:
            facts["queue"] = len(review_queue(session, principal))
    return page(request, "home.html", title="Home", organisation=org.name if org else "",
                facts=facts)


def _login_form(request: Request, *, status_code: int = 200, error: str | None = None,
                next_path: str = "/ui/", ended: bool = False) -> Response:
    keeper = keeper_of(request)
    nonce, form_token = keeper.login_nonce()
    response = page(request, "login.html", status_code=status_code, title="Sign in",
                    error=error, login_token=form_token, next_path=safe_next(next_path),
                    ended=ended)
    response.set_cookie(keeper.login_cookie_name, nonce, **keeper.cookie_options(15 * 60))
    return response


@router.get("/login")
def login_form(request: Request, runtime: RuntimeDep,
               next: Annotated[str, Query(max_length=300)] = "/ui/",
               ended: Annotated[bool, Query()] = False) -> Response:
    """The sign-in form (already signed in: straight on to ``next``)."""
    try:
        web_principal(request, runtime)
    except SignInRequired:
        return _login_form(request, next_path=next, ended=ended)
    return RedirectResponse(safe_next(next), status_code=303)


@router.post("/login")
def login(request: Request, runtime: RuntimeDep,
          token: Annotated[str, Form(max_length=300)] = "",
          login_token: Annotated[str, Form(max_length=200)] = "",
          next: Annotated[str, Form(max_length=300)] = "/ui/") -> Response:
    """Check the token; on success set a fresh session cookie (never the token)."""
    keeper = keeper_of(request)
    if request.headers.get("sec-fetch-site", "") == "cross-site" or not keeper.check_login(
            request.cookies.get(keeper.login_cookie_name), login_token):
        return _login_form(request, status_code=400, next_path=next,
                           error="The sign-in form expired or did not come from this site. "
                                 "Please try again.")
    token = token.strip()
    with runtime.db.transaction() as session:
        principal = authenticate(session, token)
        token_id = session.scalar(select(ApiToken.id).where(
            ApiToken.token_hash == hash_token(token))) if principal else None
        if principal is None or token_id is None:
            return _login_form(request, status_code=401, next_path=next,
                               error="That token is invalid, expired or revoked.")
        web_session = keeper.issue(token_id=token_id, user_id=principal.user_id)
        record(session, actor_id=principal.user_id, action="web.signed_in",
               object_type="user", object_id=principal.user_id,
               detail={"session": web_session.reference})
    response = RedirectResponse(safe_next(next), status_code=303)
    response.set_cookie(keeper.cookie_name, keeper.encode(web_session),
                        **keeper.cookie_options(keeper.remaining(web_session)))
    response.delete_cookie(keeper.login_cookie_name, path="/", secure=keeper.secure,
                           httponly=True, samesite="strict")
    return response


@router.post("/logout")
def logout(request: Request, runtime: RuntimeDep, principal: CsrfPrincipal) -> Response:
    """End the session: its id is refused from now on and the cookie is deleted."""
    keeper = keeper_of(request)
    web_session = request.state.web_session
    keeper.end(web_session)
    request.state.web_cookie = None
    with runtime.db.transaction() as session:
        record(session, actor_id=principal.user_id, action="web.signed_out",
               object_type="user", object_id=principal.user_id,
               detail={"session": web_session.reference})
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(keeper.cookie_name, path="/", secure=keeper.secure,
                           httponly=True, samesite="strict")
    return response
