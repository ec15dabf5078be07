"""API hygiene: body caps (413), per-organisation flood control (429), metrics, health,
mass assignment ignored, OpenAPI complete."""

from __future__ import annotations

from conftest import QUERY, Api


def test_large_json_body_is_413(ready: Api) -> None:
    big = {"kind": "script", "script": {"dataset": "enterprises", "source": "x" * 2_000_000}}
    response = ready.as_("analyst").post("/v1/jobs", json=big)
    assert response.status_code == 413 and "larger than" in response.json()["detail"]


def test_submission_flood_is_429(ready: Api) -> None:
    ready.home.runtime.settings.submissions_per_minute = 3
    codes = [ready.as_("analyst").post("/v1/jobs", json={"query": {**QUERY, "epsilon": 0.01}})
             .status_code for _ in range(5)]
    assert codes == [201, 201, 201, 429, 429]
    response = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY})
    assert response.headers["retry-after"] == "60"


def test_pending_quota_is_429(ready: Api) -> None:
    ready.home.runtime.settings.max_pending_jobs = 2
    codes = [ready.as_("analyst").post("/v1/jobs", json={"query": {**QUERY, "epsilon": 0.01}})
             .status_code for _ in range(3)]
    assert codes == [201, 201, 429]


def test_idempotent_retry_is_not_throttled(ready: Api) -> None:
    ready.home.runtime.settings.max_pending_jobs = 1
    headers = {"Idempotency-Key": "same"}
    first = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY}, headers=headers)
    again = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert first.json()["id"] == again.json()["id"]


def test_mass_assignment_is_refused(ready: Api) -> None:
    for extra in ({"status": "released"}, {"spent": 0}, {"owner_id": "x"}, {"approved": True}):
        response = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY, **extra})
        assert response.status_code == 422, extra
    draft = ready.as_("owner").post("/v1/datasets/enterprises/policies",
                                    json={"yaml": "x", "status": "approved"})
    assert draft.status_code == 422


def test_metrics_and_health(ready: Api) -> None:
    ready.as_("analyst").post("/v1/jobs", json={"query": QUERY})
    text = ready.as_("analyst").get("/metrics").text
    assert 'sandbox_jobs{status="queued"} 1' in text
    assert "sandbox_http_requests_total" in text
    assert ready.as_("analyst").get("/v1/health").json()["status"] == "ok"


def test_openapi_lists_every_route(api: Api) -> None:
    spec = api.as_("analyst").get("/openapi.json").json()
    paths = set(spec["paths"])
    for expected in ("/v1/datasets", "/v1/datasets/{name}/mock", "/v1/jobs",
                     "/v1/jobs/{job_id}/result", "/v1/reviews/{job_id}/approve",
                     "/v1/releases/public-key", "/v1/budget/{name}", "/v1/queries/estimate",
                     "/v1/queries/compile", "/v1/datasets/{name}/policies/diff", "/metrics"):
        assert expected in paths, expected
