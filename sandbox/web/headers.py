"""Security headers for every response under ``/ui`` (pages, errors, redirects, static).

- ``Content-Security-Policy``: nothing but this origin's stylesheet, images from this
  origin or ``data:`` (verified PNG figures), forms posting to this origin; no script at
  all, no frames, no plugins, no ``<base>``.
- ``X-Frame-Options: DENY`` (and ``frame-ancestors 'none'``), ``X-Content-Type-Options:
  nosniff``, ``Referrer-Policy: no-referrer``, ``Cross-Origin-Opener-Policy``,
  ``Permissions-Policy``.
- ``Cache-Control: no-store`` on everything but the static stylesheet: pages show outputs
  under review, policies and audit events.
- The sliding session refresh: when the session dependency left a fresh cookie in the
  request state (``web_cookie``), it is set here, on whatever response the page made.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "/ui"
STATIC_PREFIX = "/ui/static/"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), interest-cohort=()",
}


def is_ui(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


class UiHeaders:
    """ASGI middleware adding the headers above to responses for ``/ui`` paths."""

    def __init__(self, app: ASGIApp, *, cookie: Any) -> None:
        self.app = app
        self.cookie = cookie  # callable(state) -> list of Set-Cookie header values

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_ui(scope["path"]):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        static = scope["path"].startswith(STATIC_PREFIX)

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in HEADERS.items():
                    headers[name] = value
                headers["Cache-Control"] = "public, max-age=3600" if static else "no-store"
                if not static:
                    headers["Pragma"] = "no-cache"
                for value in self.cookie(state):
                    headers.append("set-cookie", value)
            await send(message)

        await self.app(scope, receive, with_headers)
