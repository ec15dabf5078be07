"""The five steps through the API in-process, and the steps that must fail closed."""

from __future__ import annotations

import copy

import polars as pl
import pyarrow.parquet as pq
from conftest import QUERY, Api, Home
from sqlalchemy import select

from sandbox.db.models import DatasetVersion
from sandbox.identity.service import Role, create_organisation, create_user, issue_token


def submit(api: Api, query: dict | None = None, key: str | None = None):
    headers = {"Idempotency-Key": key} if key else {}
    return api.as_("analyst").post("/v1/jobs", json={"kind": "query", "query": query or QUERY},
                                   headers=headers)


def test_whole_story(ready: Api) -> None:
    job = submit(ready)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert ready.home.worker().run_once()
    status = ready.as_("analyst").get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "pending_review"
    assert ready.as_("analyst").get(f"/v1/jobs/{job_id}/result").status_code == 404
    queue = ready.as_("reviewer").get("/v1/reviews").json()
    assert [j["id"] for j in queue] == [job_id]
    review = ready.as_("reviewer").get(f"/v1/reviews/{job_id}").json()
    assert len(review["output"]["rows"]) == 13
    approved = ready.as_("reviewer").post(f"/v1/reviews/{job_id}/approve")
    assert approved.status_code == 200, approved.text
    result = ready.as_("analyst").get(f"/v1/jobs/{job_id}/result").json()
    assert [c["name"] for c in result["columns"]] == ["city", "count", "sum_annual_revenue",
                                                      "mean_employees"]
    assert len(result["rows"]) == 13
    for row in result["rows"]:
        for name in ("count", "sum_annual_revenue"):
            cell = row[name]
            assert cell["low"] < cell["value"] < cell["high"]
    assert result["epsilon"] <= 0.5
    assert result["budget"]["spent"] == 0.5
    assert result["budget"]["left"] == 4.5
    budget = ready.as_("analyst").get("/v1/budget/enterprises").json()
    assert budget["spent"] == 0.5 and budget["organisation"]["spent"] == 0.5


def test_released_counts_are_close_to_truth(ready: Api, demo_files) -> None:
    table = pq.read_table(demo_files[0])
    truth = (pl.from_arrow(table).filter(pl.col("industry") == "manufacturing")
             .group_by("city").len())
    job_id = submit(ready).json()["id"]
    ready.home.worker().run_once()
    ready.as_("reviewer").post(f"/v1/reviews/{job_id}/approve")
    result = ready.as_("analyst").get(f"/v1/jobs/{job_id}/result").json()
    true_counts = dict(truth.iter_rows())
    within = sum(row["count"]["low"] <= true_counts.get(row["city"], 0) <= row["count"]["high"]
                 for row in result["rows"])
    assert within >= 9  # 95% intervals over 13 cells: fewer than 9 has probability ~3e-4


def test_query_before_policy_is_refused(api: Api, demo_files) -> None:
    api.register(demo_files)
    response = submit(api)
    assert response.status_code == 409
    assert "no approved policy" in response.json()["detail"]


def test_draft_policy_is_not_in_force(api: Api, demo_files) -> None:
    api.register(demo_files)
    from conftest import POLICY_YAML
    api.as_("owner").post("/v1/datasets/enterprises/policies", json={"yaml": POLICY_YAML})
    assert submit(api).status_code == 409


def test_epsilon_over_cap_is_refused(ready: Api) -> None:
    response = submit(ready, {**QUERY, "epsilon": 2.0})
    assert response.status_code == 422
    assert "per-job cap" in response.json()["detail"]


def test_unknown_column_is_refused(ready: Api) -> None:
    response = submit(ready, {**QUERY, "group_by": ["district"]})
    assert response.status_code == 422
    assert "no column 'district'" in response.json()["detail"]


def test_core_column_is_refused(ready: Api) -> None:
    query = copy.deepcopy(QUERY)
    query["filters"] = [{"column": "enterprise_id", "op": "==", "value": "E0000000000"}]
    response = submit(ready, query)
    assert response.status_code == 422
    assert "L4" in response.json()["detail"]


def test_bad_epsilons_are_refused(ready: Api) -> None:
    for bad in (-1, 0, "0.5", 1e-300, 1e9, None, True):
        response = submit(ready, {**QUERY, "epsilon": bad})
        assert response.status_code == 422, bad
    for bad in ("NaN", "Infinity"):
        raw = ('{"kind":"query","query":{"dataset":"enterprises","aggregates":[{"kind":"count"}],'
               f'"epsilon":{bad}}}}}')
        response = ready.as_("analyst").post("/v1/jobs", content=raw,
                                             headers={"Content-Type": "application/json"})
        assert response.status_code == 422, bad
    assert ready.as_("analyst").get("/v1/budget/enterprises").json()["spent"] == 0


def test_idempotency_key(ready: Api) -> None:
    first = submit(ready, key="k1")
    again = submit(ready, key="k1")
    assert first.status_code == 201 and again.status_code == 201
    assert first.json()["id"] == again.json()["id"]
    other = submit(ready, {**QUERY, "epsilon": 0.25}, key="k1")
    assert other.status_code == 422


def test_other_organisation_sees_404(ready: Api) -> None:
    job_id = submit(ready).json()["id"]
    with ready.home.runtime.db.transaction() as session:
        create_organisation(session, "other-co", actor_id=None)
        user = create_user(session, "analyst-other", org_name="other-co", role=Role.ANALYST,
                           actor_id=None)
        token = issue_token(session, user, actor_id=None)
    ready.home.tokens["other"] = token
    other = ready.as_("other")
    assert other.get(f"/v1/jobs/{job_id}").status_code == 404
    assert other.get("/v1/jobs/does-not-exist").status_code == 404
    assert other.get(f"/v1/jobs/{job_id}").json() == other.get("/v1/jobs/nope").json() | {
        "detail": f"job {job_id!r} not found"}


def test_roles_are_enforced(ready: Api) -> None:
    job_id = submit(ready).json()["id"]
    ready.home.worker().run_once()
    assert ready.as_("analyst").post(f"/v1/reviews/{job_id}/approve").status_code == 403
    assert ready.as_("analyst").post("/v1/datasets/enterprises/policies",
                                     json={"yaml": "x"}).status_code == 403
    assert ready.as_("owner").post("/v1/jobs", json={"query": QUERY}).status_code == 403
    response = ready.as_("reviewer").post(f"/v1/reviews/{job_id}/reject",
                                          json={"reason": "too detailed"})
    assert response.status_code == 200
    assert ready.as_("analyst").get(f"/v1/jobs/{job_id}").json()["status"] == "rejected"


def test_bad_tokens_get_401(api: Api) -> None:
    from fastapi.testclient import TestClient
    client = TestClient(api.app)
    assert client.get("/v1/datasets").status_code == 401
    assert client.get("/v1/datasets", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/v1/datasets", headers={"Authorization": "Basic abc"}).status_code == 401


def test_stored_file_holds_no_plaintext(ready: Api, demo_files) -> None:
    home: Home = ready.home
    with home.runtime.db.transaction() as session:
        version = session.scalar(select(DatasetVersion))
        assert version is not None
        stored = (home.settings.data_dir / version.storage_file).read_bytes()
    table = pq.read_table(demo_files[0])
    needles = [b"Nanjing", b"manufacturing", table.column("enterprise_id")[0].as_py().encode(),
               str(table.column("annual_revenue")[0].as_py()).encode()]
    for needle in needles:
        assert needle not in stored, needle
    assert b"PAR1" not in stored and b"ARROW1" not in stored
