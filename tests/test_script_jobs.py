"""Script jobs end to end in-process: screening, a real run through bubblewrap with the
broker charging each query once, a mock run, limits, and refusals."""

from __future__ import annotations

import shutil

import pytest
from conftest import Api, missing_part

SCRIPT = '''
from sandbox.sdk import datasets, count, sum, mean, emit
q = (datasets["enterprises"].filter("industry", "==", "manufacturing")
     .group_by("city").agg(count(), sum("annual_revenue")))
table = q.release(epsilon=0.2)
print("got", len(table), "rows")
emit("by_city", table)
total = datasets["enterprises"].agg(mean("employees")).release(epsilon=0.1)
emit("note", "mean employees about " + str(round(total.values()[0]["mean_employees"])))
'''


@pytest.fixture
def bwrap_ready(ready: Api) -> Api:
    if shutil.which("bwrap") is None:
        missing_part("bubblewrap (apt-get install bubblewrap)")
    return ready


def _submit(api: Api, source: str, mode: str = "real") -> dict:
    response = api.as_("analyst").post("/v1/jobs", json={
        "kind": "script", "script": {"dataset": "enterprises", "source": source,
                                     "mode": mode}})
    assert response.status_code == 201, response.text
    return response.json()


def test_real_script_job(bwrap_ready: Api) -> None:
    api = bwrap_ready
    job = _submit(api, SCRIPT)
    assert api.home.worker().run_once()
    status = api.as_("analyst").get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "pending_review", status
    assert api.as_("analyst").get(f"/v1/jobs/{job['id']}/result").status_code == 404
    review = api.as_("reviewer").get(f"/v1/reviews/{job['id']}").json()
    outputs = review["output"]["outputs"]
    assert [o["name"] for o in outputs] == ["by_city", "note"]
    assert len(outputs[0]["payload"]["rows"]) == 13
    assert review["output"]["queries"] == 2
    assert any("got 13 rows" in line["text"] for line in review["output"]["logs"])
    budget = api.as_("analyst").get("/v1/budget/enterprises").json()
    assert abs(budget["spent"] - 0.3) < 1e-9
    api.as_("reviewer").post(f"/v1/reviews/{job['id']}/approve")
    result = api.as_("analyst").get(f"/v1/jobs/{job['id']}/result").json()
    assert result["outputs"][1]["payload"].startswith("mean employees about")


def test_mock_run_charges_nothing(bwrap_ready: Api) -> None:
    api = bwrap_ready
    job = _submit(api, SCRIPT, mode="mock")
    assert api.home.worker().run_once()
    status = api.as_("analyst").get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "released", status
    result = api.as_("analyst").get(f"/v1/jobs/{job['id']}/result").json()
    assert result["mode"] == "mock" and len(result["outputs"]) == 2
    assert api.as_("analyst").get("/v1/budget/enterprises").json()["spent"] == 0


@pytest.mark.parametrize(("source", "line"), [
    ("import os\nprint(os.environ)", "line 1: import of 'os'"),
    ("x = 1\ny = ().__class__", "line 2: access to '__class__'"),
    ("eval('1+1')", "line 1: eval()"),
    ("import subprocess", "line 1"),
    ("def f(:\n  pass", "syntax error"),
])
def test_screen_refuses_with_line(ready: Api, source: str, line: str) -> None:
    response = ready.as_("analyst").post("/v1/jobs", json={
        "kind": "script", "script": {"dataset": "enterprises", "source": source}})
    assert response.status_code == 422
    assert line in response.json()["detail"]


def test_failing_script_withholds_outputs(bwrap_ready: Api) -> None:
    api = bwrap_ready
    job = _submit(api, "from sandbox.sdk import emit\nemit('x', 'y')\nraise ValueError('z')")
    api.home.worker().run_once()
    status = api.as_("analyst").get(f"/v1/jobs/{job['id']}").json()
    assert status["status"] == "failed" and "error" in status["error"]


def test_query_refusals_reach_the_script(bwrap_ready: Api) -> None:
    api = bwrap_ready
    source = '''
from sandbox.sdk import datasets, count, emit
from sandbox.sdk.channel import BrokerError
errors = []
for eps in (5.0, -1, 0.1):
    try:
        datasets["enterprises"].agg(count()).release(epsilon=eps)
        errors.append("ok")
    except BrokerError as exc:
        errors.append(str(exc)[:60])
try:
    datasets["enterprises"].group_by("enterprise_id").agg(count()).release(epsilon=0.1)
except BrokerError as exc:
    errors.append(str(exc)[:60])
emit("errors", "\\n".join(errors))
'''
    job = _submit(api, source)
    api.home.worker().run_once()
    review = api.as_("reviewer").get(f"/v1/reviews/{job['id']}").json()
    text = review["output"]["outputs"][0]["payload"].splitlines()
    assert "per-job cap" in text[0] and "bad query" in text[1] and text[2] == "ok"
    assert "L4" in text[3]
    assert abs(api.as_("analyst").get("/v1/budget/enterprises").json()["spent"] - 0.1) < 1e-9
