"""Engines, transactions and migrations for SQLite (embedded default) and PostgreSQL.

SQLite runs in WAL mode with ``synchronous=FULL`` (an acknowledged commit survives a
crash) and every transaction starts with ``BEGIN IMMEDIATE``: writers are serialised up
front, so a read that later writes can never fail half-way with "database is locked".
PostgreSQL uses its defaults (fsync on) and explicit row locks where order matters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class Database:
    """Connection pools plus the two kinds of transaction.

    ``Database(url).transaction()`` yields a session inside one transaction that commits
    on normal exit and rolls back on any exception: nothing half-written.
    ``Database(url).read()`` yields a session inside one read-only transaction, for
    requests that only look: it sees one consistent snapshot, takes no lock that writers
    wait for and waits for no writer (SQLite: ``BEGIN DEFERRED`` under WAL, on
    connections with ``query_only``; PostgreSQL: a ``READ ONLY`` transaction). Any write
    in it raises.
    """

    def __init__(self, url: str, *, busy_timeout_ms: int = 30_000) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {"future": True}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy_timeout_ms / 1000}
        else:
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        if self.is_sqlite:
            _configure_sqlite(self.engine, busy_timeout_ms)
            self.read_engine: Engine = create_engine(url, **kwargs)
            _configure_sqlite(self.read_engine, busy_timeout_ms, read_only=True)
        else:
            # REPEATABLE READ: one snapshot for the whole transaction, as on SQLite (a
            # read-only transaction never fails to serialise)
            self.read_engine = create_engine(
                url, **kwargs, execution_options={"postgresql_readonly": True,
                                                  "isolation_level": "REPEATABLE READ"})
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        self._read_factory = sessionmaker(self.read_engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def transaction(self) -> AbstractContextManager[Session]:
        """One transaction: commit on success, roll back on any exception."""
        return _within(self._factory)

    def read(self) -> AbstractContextManager[Session]:
        """One read-only transaction (see the class docstring); objects loaded in it stay
        usable after it ends."""
        return _within(self._read_factory)

    def migrate(self) -> None:
        """Apply every Alembic migration up to head (idempotent)."""
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.attributes["connection_url"] = self.url
        with self.engine.begin() as connection:
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")

    def checkpoint(self) -> None:
        """SQLite: copy the WAL into the database file and truncate the WAL (outside any
        transaction), so pages zeroed by ``secure_delete`` replace the old ones."""
        if not self.is_sqlite:
            return
        raw = self.engine.raw_connection()
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()

    def dispose(self) -> None:
        self.engine.dispose()
        self.read_engine.dispose()


@contextmanager
def _within(factory: sessionmaker[Session]) -> Iterator[Session]:
    session = factory()
    try:
        with session.begin():
            yield session
    finally:
        session.close()


def hold_lock(session: Session, name: str) -> None:
    """Hold the database-wide lock ``name`` until ``session``'s transaction ends, so that
    transactions taking the same lock run one after another. PostgreSQL: a
    transaction-scoped advisory lock (a later statement sees what the previous holder
    committed). SQLite: the transaction itself is the lock (``BEGIN IMMEDIATE`` runs alone
    among writers), so it is begun here rather than at the first statement, which may
    come after what the lock must cover."""
    if session.get_bind().dialect.name != "postgresql":
        session.connection()  # begins the transaction: BEGIN IMMEDIATE now
        return
    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": advisory_key(name)})


def advisory_key(name: str) -> int:
    """The PostgreSQL advisory-lock key (a signed 64-bit integer) for lock ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int, *, read_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so BEGIN is ours.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")  # zero freed content (shredded keys)
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")
