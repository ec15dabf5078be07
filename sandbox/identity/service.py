"""Identity: organisations, users with one role each, and bearer tokens.

Tokens are random (``sbx_`` + 32 bytes urlsafe), shown once, stored only as a SHA-256
hash, and may expire or be revoked. ``authenticate`` is the single gate: a token that is
unknown, revoked, expired, or whose user is disabled yields ``None``.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.db.models import ApiToken, Organisation, User, as_utc, utcnow
from sandbox.errors import Invalid


class Role(StrEnum):
    ADMIN = "admin"
    OWNER = "owner"
    ANALYST = "analyst"
    REVIEWER = "reviewer"


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from a token, passed to every service call."""

    user_id: str
    name: str
    org_id: str
    role: Role


class IdentityError(Invalid):
    """A bad identity request (duplicate name, unknown organisation)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_organisation(session: Session, name: str, *, actor_id: str | None) -> Organisation:
    if session.scalar(select(Organisation).where(Organisation.name == name)):
        raise IdentityError(f"organisation {name!r} already exists")
    org = Organisation(name=name)
    session.add(org)
    session.flush()
    record(session, actor_id=actor_id, action="organisation.created",
           object_type="organisation", object_id=org.id, detail={"name": name})
    return org


def get_organisation(session: Session, name: str) -> Organisation:
    org = session.scalar(select(Organisation).where(Organisation.name == name))
    if org is None:
        raise IdentityError(f"organisation {name!r} does not exist")
    return org


def create_user(session: Session, name: str, *, org_name: str, role: Role,
                actor_id: str | None) -> User:
    if session.scalar(select(User).where(User.name == name)):
        raise IdentityError(f"user {name!r} already exists")
    org = get_organisation(session, org_name)
    user = User(name=name, org_id=org.id, role=Role(role).value)
    session.add(user)
    session.flush()
    record(session, actor_id=actor_id, action="user.created", object_type="user",
           object_id=user.id, detail={"name": name, "org": org_name, "role": str(role)})
    return user


def issue_token(session: Session, user: User, *, actor_id: str | None,
                ttl: timedelta | None = timedelta(days=90)) -> str:
    """Create a token for ``user``; the plaintext is returned once and never stored."""
    token = "sbx_" + secrets.token_urlsafe(32)
    row = ApiToken(user_id=user.id, token_hash=hash_token(token),
                   expires_at=(utcnow() + ttl) if ttl else None)
    session.add(row)
    session.flush()
    record(session, actor_id=actor_id, action="token.issued", object_type="token",
           object_id=row.id, detail={"user": user.name})
    return token


def authenticate(session: Session, token: str) -> Principal | None:
    """The principal a bearer token stands for, or ``None`` if it must be refused."""
    if not token or len(token) > 200:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    return _principal_of(session, row)


def authenticate_token_id(session: Session, token_id: str) -> Principal | None:
    """The principal of the stored token with row id ``token_id``, under exactly the rules
    of ``authenticate`` (revoked, expired or disabled: ``None``). The web pages' sessions
    hold the token's id, never the token, and re-check it on every request."""
    if not token_id or len(token_id) > 64:
        return None
    return _principal_of(session, session.get(ApiToken, token_id))


def _principal_of(session: Session, row: ApiToken | None) -> Principal | None:
    if row is None or row.revoked_at is not None:
        return None
    expires = as_utc(row.expires_at)
    if expires is not None and expires <= utcnow():
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled_at is not None:
        return None
    return Principal(user_id=user.id, name=user.name, org_id=user.org_id, role=Role(user.role))
