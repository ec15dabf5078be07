"""The FastAPI application: routers, error mapping, health."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from sandbox import __version__, web
from sandbox.api.hygiene import BodyLimit, Metrics
from sandbox.api.routers import (
    budget,
    datasets,
    jobs,
    policies,
    queries,
    releases,
    reviews,
)
from sandbox.audit import record
from sandbox.datasets.ingest import IngestError
from sandbox.datasets.schema import SchemaError
from sandbox.datasets.spool import reap_stale_uploads
from sandbox.db.models import Job
from sandbox.errors import SandboxError
from sandbox.runtime import Runtime

log = logging.getLogger("sandbox.api")


def create_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="Sandbox: private data, usable but invisible", version=__version__,
                  description="Analysts submit queries; only differentially private, "
                              "reviewed results come out. Authenticate with "
                              "`Authorization: Bearer <token>`.")
    app.state.runtime = runtime
    # what crashed API processes left: upload spools (unreadable, their keys died with
    # the process) and the plaintext upload directories of older versions on tmpfs
    reap_stale_uploads(runtime.settings.effective_upload_spool_dir)
    reap_stale_uploads(runtime.settings.tmpfs_dir)
    metrics = Metrics()
    app.add_middleware(BodyLimit, max_bytes=runtime.settings.max_request_bytes)

    @app.middleware("http")
    async def _observe(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.observe(request.method, getattr(route, "path", "unmatched"),
                        response.status_code, time.perf_counter() - started)
        return response
    for module in (datasets, policies, jobs, reviews, releases, budget, queries):
        app.include_router(module.router)
    web.mount(app)  # the pages under /ui/; their errors are rendered by web.error_page

    @app.get("/v1/health", tags=["health"], summary="Liveness and database reachability")
    def health() -> dict[str, Any]:
        with runtime.db.transaction() as session:
            session.execute(text("SELECT 1"))
        return {"status": "ok", "version": __version__, "database": runtime.db.dialect}

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics (aggregate counts only)",
             response_class=PlainTextResponse)
    def prometheus() -> str:
        with runtime.db.transaction() as session:
            jobs = dict(session.execute(select(Job.status, func.count())
                                        .group_by(Job.status)).tuples().all())
        return metrics.render(jobs, {})

    @app.exception_handler(SandboxError)
    async def _sandbox_error(request: Request, exc: SandboxError) -> Response:
        if exc.status_code == 403:
            _audit_forbidden(runtime, request, str(exc))
        if (html := web.error_page(request, exc.status_code, str(exc))) is not None:
            return html
        headers = {"Retry-After": "60"} if exc.status_code == 429 else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(SchemaError)
    @app.exception_handler(IngestError)
    async def _bad_input(request: Request, exc: Exception) -> Response:
        if (html := web.error_page(request, 422, str(exc))) is not None:
            return html
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 403:
            _audit_forbidden(runtime, request, str(exc.detail))
        if (html := web.error_page(request, exc.status_code, str(exc.detail))) is not None:
            return html
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        if (html := web.error_page(request, 422, "; ".join(problems))) is not None:
            return html
        return JSONResponse({"detail": "; ".join(problems)}, status_code=422)

    @app.exception_handler(OperationalError)
    async def _database_unavailable(request: Request, exc: OperationalError) -> Response:
        log.error("database unavailable: %s", type(exc.orig).__name__)
        detail = "the database is unavailable (locked or out of space); nothing was changed, " \
                 "retry later"
        if (html := web.error_page(request, 503, detail)) is not None:
            return html
        return JSONResponse({"detail": detail}, status_code=503)

    def openapi() -> dict[str, Any]:
        """Errors are ``{"detail": "<message>"}`` everywhere, 422 included."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["HTTPValidationError"] = {
                "title": "Error", "type": "object", "required": ["detail"],
                "properties": {"detail": {"type": "string", "title": "Detail"}}}
            components.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _audit_forbidden(runtime: Runtime, request: Request, reason: str) -> None:
    """Write a ``access.forbidden`` event for every 403, in its own transaction."""
    try:
        from sandbox.identity.service import authenticate
        token = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        with runtime.db.transaction() as session:
            # a web page's user was resolved from the session cookie, not a header
            principal = getattr(request.state, "principal", None) or \
                authenticate(session, token)
            record(session, actor_id=principal.user_id if principal else None,
                   action="access.forbidden", object_type="request",
                   object_id=f"{request.method} {request.url.path}"[:64],
                   detail={"reason": reason})
    except Exception:  # auditing must not turn a 403 into a 500
        log.exception("could not audit a forbidden request")
