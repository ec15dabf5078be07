"""Shared fixtures: a fresh home per test, a registered demo dataset, an API client.

Parts the suite needs for real (PostgreSQL) skip on a laptop without them, but fail
under ``CI=true``: CI must never pass by skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sandbox.api.app import create_app
from sandbox.cli.home import initialise
from sandbox.config import Settings
from sandbox.datasets.generator import write_demo_files
from sandbox.jobs.worker import Worker
from sandbox.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
POLICY_YAML = (REPO / "policies" / "enterprises.yaml").read_text()
PG_ADMIN_URL = os.environ.get("SANDBOX_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def missing_part(reason: str) -> None:
    """Skip on a laptop; fail under CI, which must never pass by skipping a real part."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"required part missing under CI: {reason}")
    pytest.skip(reason)


@dataclass
class Home:
    settings: Settings
    runtime: Runtime
    tokens: dict[str, str]

    def worker(self) -> Worker:
        return Worker(self.settings, self.runtime.db, self.runtime.keys, worker_id="test-worker")


def make_home(tmp_path: Path, database_url: str | None = None) -> Home:
    settings = Settings(home=tmp_path / "home", database_url=database_url,
                        tmpfs_dir=Path("/dev/shm"))
    tokens = initialise(settings).tokens
    return Home(settings, Runtime.open(settings), tokens)


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = make_home(tmp_path)
    yield h
    h.runtime.close()


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small copy of the bundled dataset (the owner's own files)."""
    return write_demo_files(tmp_path_factory.mktemp("owner"), 20_000, 7)


class Api:
    """A TestClient per role."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.app = create_app(home.runtime)
        self._clients: dict[str, TestClient] = {}

    def as_(self, role: str) -> TestClient:
        if role not in self._clients:
            self._clients[role] = TestClient(
                self.app, headers={"Authorization": f"Bearer {self.home.tokens[role]}"})
        return self._clients[role]

    def register(self, demo_files: tuple[Path, Path]) -> dict:
        data, schema = demo_files
        with open(data, "rb") as handle:
            response = self.as_("owner").post(
                "/v1/datasets", data={"schema": schema.read_text()},
                files={"data": (data.name, handle)})
        assert response.status_code == 201, response.text
        return response.json()

    def approve_policy(self, policy_yaml: str = POLICY_YAML) -> dict:
        owner = self.as_("owner")
        draft = owner.post("/v1/datasets/enterprises/policies", json={"yaml": policy_yaml})
        assert draft.status_code == 201, draft.text
        approved = owner.post(f"/v1/datasets/enterprises/policies/{draft.json()['version']}"
                              "/approve")
        assert approved.status_code == 200, approved.text
        return approved.json()


@pytest.fixture
def api(home: Home) -> Api:
    return Api(home)


@pytest.fixture
def ready(api: Api, demo_files: tuple[Path, Path]) -> Api:
    """The dataset registered and its policy approved."""
    api.register(demo_files)
    api.approve_policy()
    return api


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError
    name = f"sbx_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        missing_part(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(exc.orig).__name__}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


QUERY = {
    "dataset": "enterprises",
    "filters": [{"column": "industry", "op": "==", "value": "manufacturing"}],
    "group_by": ["city"],
    "aggregates": [{"kind": "count"}, {"kind": "sum", "column": "annual_revenue"},
                   {"kind": "mean", "column": "employees"}],
    "epsilon": 0.5,
}
