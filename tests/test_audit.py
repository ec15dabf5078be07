"""The audit log's hash chain: intact after real work, broken by any edit."""

from __future__ import annotations

from conftest import Home
from sqlalchemy import delete, text, update

from sandbox.audit import record, verify
from sandbox.db.models import AuditEvent


def _fill(home: Home, n: int = 5) -> None:
    with home.runtime.db.transaction() as session:
        for i in range(n):
            record(session, actor_id=None, action="test.event", object_type="test",
                   object_id=str(i), detail={"i": i})


def test_chain_is_intact(home: Home) -> None:
    _fill(home)
    with home.runtime.db.transaction() as session:
        result = verify(session)
    assert result.ok and result.events >= 5


def test_edit_is_detected(home: Home) -> None:
    _fill(home)
    with home.runtime.db.transaction() as session:
        target = verify(session).events - 2
        session.execute(update(AuditEvent).where(AuditEvent.seq == target)
                        .values(detail={"i": 999}))
    with home.runtime.db.transaction() as session:
        result = verify(session)
    assert not result.ok and result.first_bad_seq == target


def test_deletion_is_detected(home: Home) -> None:
    _fill(home)
    with home.runtime.db.transaction() as session:
        session.execute(delete(AuditEvent).where(AuditEvent.seq == 3))
    with home.runtime.db.transaction() as session:
        result = verify(session)
    assert not result.ok and result.first_bad_seq == 3


def test_reordering_is_detected(home: Home) -> None:
    _fill(home)
    with home.runtime.db.transaction() as session:
        session.execute(text("UPDATE audit_events SET seq = 1000 WHERE seq = 2"))
        session.execute(text("UPDATE audit_events SET seq = 2 WHERE seq = 3"))
        session.execute(text("UPDATE audit_events SET seq = 3 WHERE seq = 1000"))
    with home.runtime.db.transaction() as session:
        result = verify(session)
    assert not result.ok and result.first_bad_seq == 2


def test_truncation_of_the_tail_changes_the_head(home: Home) -> None:
    _fill(home)
    with home.runtime.db.transaction() as session:
        full = verify(session)
        session.execute(delete(AuditEvent).where(AuditEvent.seq == full.events))
    with home.runtime.db.transaction() as session:
        cut = verify(session)
    assert cut.ok and cut.head != full.head  # detected against an exported head
