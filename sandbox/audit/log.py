"""Append-only audit log with a hash chain.

Contract:
- ``record`` is called inside the same transaction as the change it describes, so the
  event and the change commit or roll back together.
- Each event's ``hash`` is ``sha256(prev_hash + canonical_json(event))``; ``seq`` is part
  of the hashed content, so editing, deleting, reordering or truncating rows breaks the
  chain, and ``verify`` names the first bad entry.
- Appends are serialised: SQLite transactions already hold the write lock
  (``BEGIN IMMEDIATE``); on PostgreSQL a transaction-scoped advisory lock is taken.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from sandbox.db.models import AuditEvent, as_utc, utcnow

GENESIS = "0" * 64
_PG_AUDIT_LOCK = 0x5A4E_4458  # arbitrary constant naming the audit chain lock


def _canonical(seq: int, at: datetime, actor_id: str | None, action: str, object_type: str,
               object_id: str, detail: dict[str, Any], prev_hash: str) -> bytes:
    at_utc = as_utc(at)
    assert at_utc is not None
    body = {
        "seq": seq,
        "at": at_utc.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor_id": actor_id,
        "action": action,
        "object_type": object_type,
        "object_id": object_id,
        "detail": detail,
        "prev_hash": prev_hash,
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _hash(prev_hash: str, canonical: bytes) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical).hexdigest()


def record(session: Session, *, actor_id: str | None, action: str, object_type: str,
           object_id: str, detail: dict[str, Any] | None = None) -> AuditEvent:
    """Append one event to the chain inside the caller's transaction."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_AUDIT_LOCK})
    head = session.execute(
        select(AuditEvent.seq, AuditEvent.hash).order_by(AuditEvent.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (head[0] + 1, head[1]) if head else (1, GENESIS)
    at = utcnow()
    detail = dict(detail or {})
    digest = _hash(prev_hash, _canonical(seq, at, actor_id, action, object_type, object_id,
                                         detail, prev_hash))
    event = AuditEvent(seq=seq, at=at, actor_id=actor_id, action=action,
                       object_type=object_type, object_id=object_id, detail=detail,
                       prev_hash=prev_hash, hash=digest)
    session.add(event)
    session.flush()
    return event


@dataclass(frozen=True)
class AuditVerification:
    ok: bool
    events: int
    head: str
    first_bad_seq: int | None = None
    reason: str = ""


def verify(session: Session, *, upto: int | None = None) -> AuditVerification:
    """Walk the chain from the start (to entry ``upto`` if given); report the first entry
    that does not fit. With ``upto``, ``head`` is the hash of that entry, to compare with
    a head exported earlier (which detects truncation and rewriting of the tail)."""
    expected_prev, expected_seq, count = GENESIS, 1, 0
    query = select(AuditEvent).order_by(AuditEvent.seq)
    if upto is not None:
        query = query.where(AuditEvent.seq <= upto)
    for event in session.scalars(query):
        count += 1
        if event.seq != expected_seq:
            return AuditVerification(False, count, expected_prev, expected_seq,
                                     f"entry {expected_seq} is missing (found {event.seq} next)")
        if event.prev_hash != expected_prev:
            return AuditVerification(False, count, expected_prev, event.seq,
                                     f"entry {event.seq} does not link to entry {event.seq - 1}")
        digest = _hash(event.prev_hash, _canonical(
            event.seq, event.at, event.actor_id, event.action, event.object_type,
            event.object_id, event.detail, event.prev_hash))
        if digest != event.hash:
            return AuditVerification(False, count, expected_prev, event.seq,
                                     f"entry {event.seq} was modified (hash mismatch)")
        expected_prev, expected_seq = event.hash, event.seq + 1
    return AuditVerification(True, count, expected_prev)
