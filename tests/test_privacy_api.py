"""The privacy engine through the API: DP-SQL jobs, rho costs, batch estimates, SDC mode,
per-organisation limits, policy history."""

from __future__ import annotations

from conftest import POLICY_YAML, QUERY, Api

SQL = ("SELECT city, COUNT(*), SUM(annual_revenue) FROM enterprises "
       "WHERE industry = 'manufacturing' GROUP BY city")


def _run(api: Api, body: dict) -> dict:
    response = api.as_("analyst").post("/v1/jobs", json=body)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert api.home.worker().run_once()
    status = api.as_("analyst").get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "pending_review", status
    assert api.as_("reviewer").post(f"/v1/reviews/{job_id}/approve").status_code == 200
    return api.as_("analyst").get(f"/v1/jobs/{job_id}/result").json()


def test_sql_job(ready: Api) -> None:
    result = _run(ready, {"sql": {"text": SQL, "epsilon": 0.5}})
    assert [c["name"] for c in result["columns"]] == ["city", "count", "sum_annual_revenue"]
    assert len(result["rows"]) == 13


def test_sql_errors_point_at_the_clause(ready: Api) -> None:
    bad = SQL.replace("WHERE industry = 'manufacturing'",
                      "WHERE industry = 'a' OR city = 'b'")
    response = ready.as_("analyst").post("/v1/jobs", json={"sql": {"text": bad,
                                                                   "epsilon": 0.5}})
    assert response.status_code == 422 and response.json()["detail"].startswith("WHERE: OR")
    compiled = ready.as_("analyst").post("/v1/queries/compile",
                                         json={"text": SQL, "epsilon": 0.5})
    assert compiled.status_code == 200 and compiled.json()["group_by"] == ["city"]


def test_rho_cost_on_a_rho_budget(api: Api, demo_files) -> None:
    api.register(demo_files)
    api.approve_policy(POLICY_YAML.replace("unit: epsilon", "unit: rho"))
    result = _run(api, {"query": {**QUERY, "epsilon": None, "rho": 0.2}})
    assert result["mechanism"] == "gaussian"
    assert result["budget"]["unit"] == "rho" and abs(result["budget"]["spent"] - 0.2) < 1e-9
    # a pure-epsilon cost is converted exactly: epsilon 0.5 is rho 0.125
    result = _run(api, {"query": QUERY})
    assert abs(result["budget"]["spent"] - 0.325) < 1e-9


def test_rho_cost_on_an_epsilon_budget_is_refused(ready: Api) -> None:
    response = ready.as_("analyst").post(
        "/v1/jobs", json={"query": {**QUERY, "epsilon": None, "rho": 0.2}})
    assert response.status_code == 422 and "kept in epsilon" in response.json()["detail"]


def test_batch_estimate(ready: Api) -> None:
    response = ready.as_("analyst").post("/v1/queries/estimate", json={"queries": [
        QUERY, {**QUERY, "epsilon": 0.25, "aggregates": [{"kind": "median",
                                                          "column": "employees"}]}]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert abs(body["total_charged"] - 0.75) < 1e-12
    assert body["estimates"][1]["rank_error"]["median_employees"] > 0
    assert ready.as_("analyst").get("/v1/budget/enterprises").json()["spent"] == 0


def test_dp_keys_job(ready: Api) -> None:
    result = _run(ready, {"query": {**QUERY, "keys": "dp", "delta": 1e-7}})
    assert result["keys"] == "dp" and result["threshold"] >= 10
    assert 1 <= len(result["rows"]) <= 13
    budget = ready.as_("analyst").get("/v1/budget/enterprises").json()
    assert budget["delta_spent"] == 1e-7


def test_sdc_mode(api: Api, demo_files) -> None:
    api.register(demo_files)
    api.approve_policy(POLICY_YAML.replace("mode: dp", "mode: sdc"))
    query = {k: v for k, v in QUERY.items() if k != "epsilon"}
    query["group_by"] = ["city", "industry"]
    query["filters"] = []
    result = _run(api, {"query": query})
    assert result["mode"] == "sdc" and result["findings"]
    statuses = {row["count"]["status"] for row in result["rows"]}
    assert "ok" in statuses
    for row in result["rows"]:
        if row["count"]["status"] == "ok":
            assert row["count"]["value"] % 5 == 0  # rounded to base 5
        else:
            assert row["count"]["value"] is None
    assert api.as_("analyst").get("/v1/budget/enterprises").json()["spent"] == 0
    with_cost = api.as_("analyst").post("/v1/jobs", json={"query": {**query, "epsilon": 0.1}})
    assert with_cost.status_code == 422


def test_kinds_not_allowed_by_policy(api: Api, demo_files) -> None:
    api.register(demo_files)
    api.approve_policy(POLICY_YAML.replace(
        "kinds: [count, sum, mean, quantile, median, histogram]", "kinds: [count]"))
    response = api.as_("analyst").post("/v1/jobs", json={"query": QUERY})
    assert response.status_code == 422 and "allows only count" in response.json()["detail"]


def test_policy_history_diff(api: Api, demo_files) -> None:
    api.register(demo_files)
    api.approve_policy()
    api.approve_policy(POLICY_YAML.replace("total: 5.0", "total: 4.0"))
    diff = api.as_("owner").get("/v1/datasets/enterprises/policies/diff",
                                params={"from_version": 1, "to_version": 2})
    assert diff.status_code == 200
    text = diff.json()["diff"]
    assert "-  total: 5.0" in text and "+  total: 4.0" in text
