"""The same story on the machine's PostgreSQL: migrations, API, worker, ledger, audit."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import QUERY, Api, make_home

from sandbox.audit import verify

pytestmark = pytest.mark.postgres


def test_story_on_postgres(tmp_path: Path, pg_url: str, demo_files) -> None:
    home = make_home(tmp_path, database_url=pg_url)
    try:
        assert home.runtime.db.dialect == "postgresql"
        api = Api(home)
        api.register(demo_files)
        api.approve_policy()
        job = api.as_("analyst").post("/v1/jobs", json={"query": QUERY},
                                      headers={"Idempotency-Key": "pg-1"})
        assert job.status_code == 201, job.text
        again = api.as_("analyst").post("/v1/jobs", json={"query": QUERY},
                                        headers={"Idempotency-Key": "pg-1"})
        assert again.json()["id"] == job.json()["id"]
        assert home.worker().run_once()
        job_id = job.json()["id"]
        assert api.as_("reviewer").post(f"/v1/reviews/{job_id}/approve").status_code == 200
        result = api.as_("analyst").get(f"/v1/jobs/{job_id}/result").json()
        assert len(result["rows"]) == 13
        assert result["budget"]["spent"] == pytest.approx(0.5)
        with home.runtime.db.transaction() as session:
            audit = verify(session)
        assert audit.ok and audit.events > 10
    finally:
        home.runtime.close()
