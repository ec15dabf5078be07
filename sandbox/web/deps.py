"""Dependencies of the web pages: the signed-in user (from the session cookie) and the
CSRF check every state-changing form goes through.

``web_principal`` resolves the cookie with ``SessionKeeper.decode`` and then the token it
names with ``authenticate_token_id``, the same rules as the API's bearer tokens; anything
else is ``SignInRequired`` (a redirect to the sign-in form). Role and object checks are
the API's own (``require_role``, ``sandbox.api.ownership``), applied by each page.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Form, Request
from starlette.responses import Response

from sandbox.api.deps import RuntimeDep
from sandbox.errors import Forbidden
from sandbox.identity.service import Principal, authenticate_token_id
from sandbox.web.session import SessionKeeper


class SignInRequired(Exception):
    """No valid session: the page answers with a redirect to the sign-in form."""

    def __init__(self, next_path: str, ended: bool) -> None:
        super().__init__("sign in required")
        self.next_path = next_path
        self.ended = ended


def keeper_of(request: Request) -> SessionKeeper:
    keeper: SessionKeeper = request.app.state.web_sessions
    return keeper


def web_principal(request: Request, runtime: RuntimeDep) -> Principal:
    """The signed-in user; ``SignInRequired`` when the cookie is missing, forged, expired,
    signed out, or names a token that is revoked or expired or a user who is disabled."""
    keeper = keeper_of(request)
    raw = request.cookies.get(keeper.cookie_name)
    web_session = keeper.decode(raw)
    principal = None
    if web_session is not None:
        with runtime.db.read() as session:
            principal = authenticate_token_id(session, web_session.token_id)
    if web_session is None or principal is None or principal.user_id != web_session.user_id:
        next_path = request.url.path if request.method == "GET" else "/ui/"
        raise SignInRequired(next_path, ended=raw is not None)
    request.state.principal = principal
    request.state.web_session = web_session
    fresh = keeper.refreshed(web_session)
    if fresh is not None:
        request.state.web_cookie = keeper.encode(fresh)
    return principal


WebPrincipal = Annotated[Principal, Depends(web_principal)]


def csrf_checked(request: Request, principal: WebPrincipal,
                 csrf_token: Annotated[str, Form(max_length=200)] = "") -> Principal:
    """The signed-in user, after the form's CSRF token matched the session (403, audited,
    otherwise). A browser's ``Sec-Fetch-Site: cross-site`` is refused too."""
    keeper = keeper_of(request)
    if request.headers.get("sec-fetch-site", "") == "cross-site" or \
            not keeper.check_csrf(request.state.web_session, csrf_token):
        raise Forbidden("the form could not be verified (CSRF check failed): reload the "
                        "page and submit it again")
    return principal


CsrfPrincipal = Annotated[Principal, Depends(csrf_checked)]


def session_cookies(keeper: SessionKeeper, state: dict[str, object]) -> list[str]:
    """``Set-Cookie`` values for a sliding refresh left in the request state."""
    value = state.get("web_cookie")
    web_session = keeper.decode(value) if isinstance(value, str) else None
    if web_session is None:
        return []
    response = Response()
    response.set_cookie(keeper.cookie_name, value,  # type: ignore[arg-type]
                        **keeper.cookie_options(keeper.remaining(web_session)))
    return [v.decode("latin-1") for k, v in response.raw_headers if k == b"set-cookie"]


def sign_in_url(next_path: str, ended: bool = False) -> str:
    """The sign-in form's address, remembering a safe ``next`` page under ``/ui/``."""
    url = "/ui/login"
    params = []
    if safe_next(next_path) != "/ui/":
        params.append("next=" + quote(next_path, safe="/"))
    if ended:
        params.append("ended=1")
    return url + ("?" + "&".join(params) if params else "")


def safe_next(value: str | None) -> str:
    """``value`` if it is a path of these pages (no scheme, host or ``//``), else ``/ui/``."""
    if not value or not value.startswith("/ui/") or "//" in value or "\\" in value \
            or any(ord(c) < 0x21 or c in "\"'<>" for c in value) or len(value) > 300:
        return "/ui/"
    return value
