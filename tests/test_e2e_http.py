"""End to end through real HTTP: ``sandbox serve`` (API + worker process) on a loopback
port, each role with its own token, the five steps of the story."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import POLICY_YAML, QUERY

from sandbox.cli.client import ApiError, SandboxClient
from sandbox.cli.demo import _free_port, _wait_healthy
from sandbox.cli.home import initialise
from sandbox.config import Settings


@pytest.fixture
def server(tmp_path: Path):
    home = tmp_path / "home"
    tokens = initialise(Settings(home=home)).tokens
    port = _free_port()
    env = {**os.environ, "SANDBOX_HOME": str(home), "SANDBOX_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "sandbox.cli.main", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, tokens
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_five_steps_over_http(server, demo_files) -> None:
    url, tokens = server
    owner = SandboxClient(url, tokens["owner"])
    analyst = SandboxClient(url, tokens["analyst"])
    reviewer = SandboxClient(url, tokens["reviewer"])
    data, schema = demo_files
    # 1-2: the owner registers the dataset
    detail = owner.register_dataset(schema, data)
    assert detail["name"] == "enterprises" and detail["versions"][0]["version"] == 1
    with pytest.raises(ApiError) as refused:
        analyst.submit_query(QUERY)
    assert refused.value.status_code == 409
    # 3: the owner's policy
    draft = owner.draft_policy("enterprises", POLICY_YAML)
    owner.approve_policy("enterprises", draft["version"])
    # 4: the analyst's query, answered by the worker process
    job = analyst.submit_query(QUERY)
    job = analyst.wait(job["id"], timeout=120)
    assert job["status"] == "pending_review", job
    with pytest.raises(ApiError) as early:
        analyst.result(job["id"])
    assert early.value.status_code == 404
    # 5: review, release, fetch
    assert [j["id"] for j in reviewer.review_queue()] == [job["id"]]
    reviewer.approve(job["id"])
    released = analyst.result(job["id"])
    assert len(released["rows"]) == 13
    assert all(r["count"]["low"] <= r["count"]["value"] <= r["count"]["high"]
               for r in released["rows"])
    assert released["budget"]["left"] == pytest.approx(4.5)
    assert analyst.budget("enterprises")["spent"] == pytest.approx(0.5)


SCRIPT = '''
from sandbox.sdk import datasets, count, mean, emit
by_city = (datasets["enterprises"].filter("industry", "==", "manufacturing")
           .group_by("city").agg(count(), mean("employees")).release(epsilon=0.3))
print("cities:", len(by_city))
emit("manufacturing_by_city", by_city)
'''


def test_script_mock_then_real_over_http(server, demo_files, tmp_path: Path) -> None:
    url, tokens = server
    owner = SandboxClient(url, tokens["owner"])
    analyst = SandboxClient(url, tokens["analyst"])
    reviewer = SandboxClient(url, tokens["reviewer"])
    data, schema = demo_files
    owner.register_dataset(schema, data)
    owner.approve_policy("enterprises", owner.draft_policy("enterprises", POLICY_YAML)["version"])
    # the analyst debugs locally on mock data, in the same sandbox
    script = tmp_path / "analysis.py"
    script.write_text(SCRIPT)
    local = subprocess.run([sys.executable, "-m", "sandbox.cli.main", "run", str(script),
                            "--mock", "--dataset", "enterprises", "--url", url,
                            "--token", tokens["analyst"]], capture_output=True, text=True,
                           timeout=120)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "cities: 13" in local.stdout and "manufacturing_by_city" in local.stdout
    # a mock job on the server: released at once, no budget
    mock = analyst.submit_script("enterprises", SCRIPT, mode="mock")
    assert analyst.wait(mock["id"], timeout=120)["status"] == "released"
    assert analyst.result(mock["id"])["mode"] == "mock"
    assert analyst.budget("enterprises")["spent"] == 0
    # then for real: charged, reviewed, released
    real = analyst.submit_script("enterprises", SCRIPT)
    assert analyst.wait(real["id"], timeout=120)["status"] == "pending_review"
    reviewer.approve(real["id"])
    released = analyst.result(real["id"])
    assert released["mode"] == "real" and released["queries"] == 1
    assert len(released["outputs"][0]["payload"]["rows"]) == 13
    assert analyst.budget("enterprises")["spent"] == pytest.approx(0.3)
