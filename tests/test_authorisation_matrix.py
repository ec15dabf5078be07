"""Every role against every endpoint: allowed, forbidden (403) or invisible (404), and
a locked database answers 503 with nothing changed (attack catalogue 38-42, 57)."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import POLICY_YAML, QUERY, Api

from sandbox.db import Database


@pytest.fixture
def world(ready: Api) -> tuple[Api, str]:
    job_id = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY}).json()["id"]
    ready.home.worker().run_once()
    return ready, job_id


# (method, path, body) -> expected status per role
CASES = [
    ("GET", "/v1/datasets", None, {"owner": 200, "analyst": 200, "reviewer": 200, "admin": 200}),
    ("GET", "/v1/datasets/enterprises", None,
     {"owner": 200, "analyst": 200, "reviewer": 200, "admin": 200}),
    ("GET", "/v1/datasets/enterprises/policies", None,
     {"owner": 200, "analyst": 200, "reviewer": 200, "admin": 200}),
    ("GET", "/v1/datasets/enterprises/jobs", None,
     {"owner": 200, "analyst": 403, "reviewer": 403, "admin": 403}),
    ("POST", "/v1/datasets/enterprises/policies", {"yaml": "dataset: x"},
     {"owner": 422, "analyst": 403, "reviewer": 403, "admin": 403}),
    ("POST", "/v1/datasets/enterprises/policies/1/approve", None,
     {"owner": 409, "analyst": 403, "reviewer": 403, "admin": 403}),
    ("DELETE", "/v1/datasets/enterprises", None,
     {"analyst": 403, "reviewer": 403, "admin": 403}),
    ("POST", "/v1/jobs", {"query": QUERY},
     {"owner": 403, "analyst": 201, "reviewer": 403, "admin": 403}),
    ("GET", "/v1/jobs/{job}", None, {"owner": 404, "analyst": 200, "reviewer": 200, "admin": 200}),
    ("GET", "/v1/jobs/{job}/result", None,
     {"owner": 404, "analyst": 404, "reviewer": 404, "admin": 404}),
    ("POST", "/v1/jobs/{job}/cancel", None,
     {"owner": 404, "reviewer": 404, "admin": 404}),
    ("GET", "/v1/reviews", None, {"owner": 403, "analyst": 403, "reviewer": 200, "admin": 403}),
    ("GET", "/v1/reviews/{job}", None,
     {"owner": 403, "analyst": 403, "reviewer": 200, "admin": 403}),
    ("POST", "/v1/reviews/{job}/reject", {"reason": "no"},
     {"owner": 403, "analyst": 403, "admin": 403}),
    ("GET", "/v1/releases/{job}", None,
     {"owner": 404, "analyst": 404, "reviewer": 404, "admin": 404}),
    ("GET", "/v1/budget/enterprises", None,
     {"owner": 200, "analyst": 200, "reviewer": 200, "admin": 200}),
    ("POST", "/v1/queries/estimate", QUERY,
     {"owner": 200, "analyst": 200, "reviewer": 200, "admin": 200}),
    ("GET", "/v1/jobs/nonexistent", None,
     {"owner": 404, "analyst": 404, "reviewer": 404, "admin": 404}),
]


@pytest.mark.parametrize(("method", "path", "body", "expected"), CASES,
                         ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_role_matrix(world: tuple[Api, str], method: str, path: str, body: dict | None,
                     expected: dict[str, int]) -> None:
    api, job_id = world
    for role, status in expected.items():
        response = api.as_(role).request(method, path.replace("{job}", job_id), json=body)
        assert response.status_code == status, (role, response.text)
        assert "detail" in response.json() or status < 400


def test_invisible_is_identical_to_missing(world: tuple[Api, str]) -> None:
    api, job_id = world
    hidden = api.as_("owner").get(f"/v1/jobs/{job_id}").json()["detail"]
    missing = api.as_("owner").get("/v1/jobs/0123456789abcdef0123456789abcdef").json()["detail"]
    assert hidden.replace(job_id, "X") == missing.replace("0123456789abcdef0123456789abcdef", "X")


def test_forbidden_actions_are_audited(world: tuple[Api, str]) -> None:
    from sqlalchemy import select

    from sandbox.db.models import AuditEvent
    api, job_id = world
    api.as_("analyst").post(f"/v1/reviews/{job_id}/approve")
    with api.home.runtime.db.transaction() as session:
        actions = list(session.scalars(select(AuditEvent.action)))
    assert "access.forbidden" in actions


def test_locked_database_is_503_and_nothing_changes(world: tuple[Api, str]) -> None:
    api, _ = world
    url = api.home.runtime.db.url
    api.home.runtime.db = Database(url, busy_timeout_ms=200)
    path = url.removeprefix("sqlite:///")
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = api.as_("analyst").post("/v1/jobs", json={"query": QUERY})
        assert response.status_code == 503 and "unavailable" in response.json()["detail"]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    jobs = api.as_("analyst").get("/v1/jobs").json()
    assert len(jobs) == 1


def test_non_owners_of_the_owning_organisation_see_what_outsiders_see(ready: Api) -> None:
    """Drafts and the exact row count are for the dataset's owners, not for every user
    who happens to share their organisation (the ``can_own_dataset`` rule)."""
    from fastapi.testclient import TestClient
    from test_web_support import add_user

    from sandbox.identity.service import Role

    owner = ready.as_("owner")
    draft = owner.post("/v1/datasets/enterprises/policies", json={"yaml": POLICY_YAML})
    assert draft.status_code == 201, draft.text
    token = add_user(ready, "colleague", "jiangsu-data-bureau", Role.ANALYST)  # the owner's
    colleague = TestClient(ready.app, headers={"Authorization": f"Bearer {token}"})
    owner_view = owner.get("/v1/datasets/enterprises/policies").json()
    colleague_view = colleague.get("/v1/datasets/enterprises/policies").json()
    assert len(owner_view) == 2
    assert [p["version"] for p in colleague_view] == [1]  # only the one in force
    versions = colleague.get("/v1/datasets/enterprises").json()["versions"]
    assert all(v["row_count"] is None for v in versions)
    assert all(v["row_count"] for v in owner.get("/v1/datasets/enterprises").json()["versions"])


def test_owners_see_the_jobs_on_their_datasets_but_never_outputs(world: tuple[Api, str]) -> None:
    from fastapi.testclient import TestClient
    from test_web_support import add_user

    from sandbox.identity.service import Role

    api, job_id = world
    jobs = api.as_("owner").get("/v1/datasets/enterprises/jobs")
    assert jobs.status_code == 200, jobs.text
    (row,) = jobs.json()
    assert row["id"] == job_id and row["organisation"] == "suzhou-analytics"
    assert row["status"] == "pending_review" and row["kind"] == "query"
    assert row["charged"] == pytest.approx(QUERY["epsilon"])
    assert not {"result", "content", "outputs", "spec"} & set(row)
    token = add_user(api, "other-owner", "another-bureau", Role.OWNER)
    other = TestClient(api.app, headers={"Authorization": f"Bearer {token}"})
    missing = other.get("/v1/datasets/enterprises/jobs")
    assert missing.status_code == 404  # as if the dataset did not exist
    absent = other.get("/v1/datasets/no-such-dataset/jobs").json()["detail"]
    assert missing.json()["detail"] == absent.replace("no-such-dataset", "enterprises")
