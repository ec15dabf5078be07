"""Errors under ``/ui`` as HTML pages (the API's handlers ask here first).

The status and the message are the API's own (the same exception, the same words); a
404 says the same for a missing object and one the user may not see. A 401 becomes a
redirect to the sign-in form.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import RedirectResponse, Response

from sandbox.web.deps import SignInRequired, sign_in_url
from sandbox.web.headers import is_ui
from sandbox.web.templating import page

TITLES = {400: "Bad request", 401: "Sign in required", 403: "Not allowed",
          404: "Not found", 405: "Not allowed", 409: "Not possible now",
          413: "Too large", 422: "Not accepted", 429: "Too many requests",
          503: "Service unavailable"}


def error_page(request: Request, status_code: int, detail: str) -> Response | None:
    """The HTML error page for a ``/ui`` request, or ``None`` for the API's paths."""
    if not is_ui(request.url.path):
        return None
    if status_code == 401:
        return RedirectResponse(sign_in_url("/ui/"), status_code=303)
    title = TITLES.get(status_code, "Error")
    return page(request, "error.html", status_code=status_code, title=title,
                status=status_code, detail=detail)


async def sign_in_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignInRequired)
    return RedirectResponse(sign_in_url(exc.next_path, exc.ended), status_code=303)


async def routing_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 and 405 (no such route or method): HTML under ``/ui``,
    FastAPI's usual JSON elsewhere."""
    assert isinstance(exc, StarletteHTTPException)
    html = error_page(request, exc.status_code, str(exc.detail))
    return html if html is not None else await http_exception_handler(request, exc)
