"""Request-level protection and observability: body size caps (413), request metrics,
and the Prometheus text endpoint."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

UPLOAD_PATHS = ("/v1/datasets",)


class BodyLimit:
    """413 for bodies over ``max_bytes`` (by Content-Length, or while streaming); dataset
    uploads have their own, larger cap in the upload parser."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"] == "POST"
                                       and scope["path"] in UPLOAD_PATHS):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode()
        if declared.isdigit() and int(declared) > self.max_bytes:
            await _too_large(send, self.max_bytes)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await _too_large(send, self.max_bytes)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int) -> None:
    body = f'{{"detail":"request body is larger than {limit} bytes"}}'.encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class Metrics:
    """Counts requests by route template and status; renders Prometheus text."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.seconds: dict[str, float] = {}
        self.started = time.time()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests[(method, route, status)] += 1
        self.seconds[route] = self.seconds.get(route, 0.0) + seconds

    def render(self, jobs: dict[str, int], extra: dict[str, Any]) -> str:
        lines = ["# HELP sandbox_http_requests_total HTTP requests by route and status",
                 "# TYPE sandbox_http_requests_total counter"]
        for (method, route, status), n in sorted(self.requests.items()):
            lines.append(f'sandbox_http_requests_total{{method="{method}",route="{route}",'
                         f'status="{status}"}} {n}')
        lines += ["# HELP sandbox_jobs Jobs by status", "# TYPE sandbox_jobs gauge"]
        lines += [f'sandbox_jobs{{status="{s}"}} {n}' for s, n in sorted(jobs.items())]
        lines += ["# TYPE sandbox_uptime_seconds gauge",
                  f"sandbox_uptime_seconds {time.time() - self.started:.0f}"]
        for name, value in extra.items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
