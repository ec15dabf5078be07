"""Read-only transactions: requests that only look neither wait for writers nor block
them, and cannot write."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import Api
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from sandbox.db import Database
from sandbox.db.models import AuditEvent


def _write_rejected(db: Database) -> None:
    with pytest.raises(DBAPIError, match=r"(?i)read.?only"), db.read() as session:
        session.execute(text("UPDATE organisations SET name = name"))


def test_a_read_cannot_write_sqlite(ready: Api) -> None:
    _write_rejected(ready.home.runtime.db)


def test_a_read_cannot_write_postgresql(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        db.migrate()
        _write_rejected(db)
    finally:
        db.dispose()


def test_pages_and_reads_do_not_wait_for_a_writer(ready: Api) -> None:
    """While a long write transaction holds SQLite's write lock (BEGIN IMMEDIATE), the
    API's GETs (and the token check of every request) answer at once: before read-only
    transactions they queued behind it for up to the busy timeout (30 s)."""
    db = ready.home.runtime.db
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with db.transaction() as session:
            session.execute(text("UPDATE organisations SET name = name"))
            holding.set()
            release.wait(30)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert holding.wait(10)
        analyst, owner = ready.as_("analyst"), ready.as_("owner")
        started = time.monotonic()
        for client, path in [(analyst, "/v1/datasets"), (analyst, "/v1/datasets/enterprises"),
                             (analyst, "/v1/budget/enterprises"), (analyst, "/v1/jobs"),
                             (owner, "/v1/datasets/enterprises/policies"),
                             (owner, "/v1/datasets/enterprises/jobs")]:
            response = client.get(path)
            assert response.status_code == 200, (path, response.text)
        assert time.monotonic() - started < 5  # the busy timeout is 30 s
        assert thread.is_alive()  # the writer still holds its transaction
    finally:
        release.set()
        thread.join(30)
    with db.read() as session:  # and the writer's transaction committed normally
        assert session.query(AuditEvent).count() > 0
