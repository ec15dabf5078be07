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


def test_cli_detects_truncation_against_an_exported_head(home: Home) -> None:
    import json
    import os
    import subprocess
    import sys
    _fill(home, 6)
    env = {**os.environ, "SANDBOX_HOME": str(home.settings.home)}
    cli = [sys.executable, "-m", "sandbox.cli.main", "audit"]
    head = json.loads(subprocess.run([*cli, "head"], env=env, capture_output=True, text=True,
                                     check=True).stdout)
    anchor = ["--expect-head", head["head"], "--expect-events", str(head["events"])]
    assert subprocess.run([*cli, "verify", *anchor], env=env).returncode == 0
    _fill(home, 2)  # growth after the export is fine
    assert subprocess.run([*cli, "verify", *anchor], env=env).returncode == 0
    with home.runtime.db.transaction() as session:
        session.execute(delete(AuditEvent).where(AuditEvent.seq > head["events"] - 2))
    cut = subprocess.run([*cli, "verify", *anchor], env=env, capture_output=True, text=True)
    assert cut.returncode == 1 and "truncated" in cut.stdout
