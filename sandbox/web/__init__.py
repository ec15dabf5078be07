"""Server-rendered pages for data owners and reviewers, under ``/ui/``.

``mount(app)`` adds the pages' routers (one per resource area: sign-in and home,
datasets and policies, jobs, reviews, audit), the stylesheet, the security-header
middleware and the sign-in redirect; ``error_page`` renders the API's errors as HTML for
``/ui`` paths. The pages hold no rule of their own about who may see or do what: they
call the API's checks (``sandbox.api.deps.require_role``, ``sandbox.api.ownership``) and,
for every decision, the API's endpoint functions. See docs/reference/web.md.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from sandbox.web.deps import SignInRequired, session_cookies
from sandbox.web.errors import error_page, routing_error, sign_in_required
from sandbox.web.headers import UiHeaders
from sandbox.web.session import SessionKeeper, load_key

__all__ = ["error_page", "mount"]


def mount(app: FastAPI) -> None:
    """Add the web pages to ``app`` (whose ``state.runtime`` is set)."""
    from sandbox.web.routers import audit, auth, datasets, jobs, reviews

    settings = app.state.runtime.settings
    keeper = SessionKeeper(load_key(settings.keys_dir), secure=settings.environment == "prod")
    app.state.web_sessions = keeper
    for module in (auth, datasets, jobs, reviews, audit):
        app.include_router(module.router)
    app.mount("/ui/static", StaticFiles(directory=Path(__file__).parent / "static"),
              name="ui-static")
    app.add_exception_handler(SignInRequired, sign_in_required)
    app.add_exception_handler(StarletteHTTPException, routing_error)
    app.add_middleware(UiHeaders, cookie=lambda state: session_cookies(keeper, state))
