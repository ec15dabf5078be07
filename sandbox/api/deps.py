"""Shared FastAPI dependencies: the runtime and the authenticated principal."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sandbox.identity.service import Principal, Role, authenticate
from sandbox.runtime import Runtime

_bearer = HTTPBearer(auto_error=False)


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_principal(runtime: RuntimeDep,
                  credentials: Annotated[HTTPAuthorizationCredentials | None,
                                         Depends(_bearer)]) -> Principal:
    """The caller; 401 for a missing, malformed, unknown, revoked or expired token."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    with runtime.db.read() as session:
        principal = authenticate(session, credentials.credentials)
    if principal is None:
        raise HTTPException(401, "invalid, expired or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_role(principal: Principal, *roles: Role) -> None:
    """403 unless the caller has one of ``roles`` (the API audits 403s centrally)."""
    if principal.role not in roles:
        names = " or ".join(r.value for r in roles)
        raise HTTPException(403, f"this action needs the {names} role")
