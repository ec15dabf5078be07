"""Reviewed and signed releases: Ed25519 signatures anyone can check, tampering detected,
the two-person rule, output checks that block row-level-looking tables."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import POLICY_YAML, QUERY, Api
from sqlalchemy import select

from sandbox.db.models import JobResult
from sandbox.identity.service import Role, create_user, issue_token
from sandbox.review.signing import ReleaseInvalid, verify


def _released(api: Api) -> str:
    job_id = api.as_("analyst").post("/v1/jobs", json={"query": QUERY}).json()["id"]
    assert api.home.worker().run_once()
    assert api.as_("reviewer").post(f"/v1/reviews/{job_id}/approve").status_code == 200
    return job_id


def test_signed_release_verifies_and_detects_tampering(ready: Api, tmp_path: Path) -> None:
    job_id = _released(ready)
    artifact = ready.as_("analyst").get(f"/v1/releases/{job_id}").json()
    public = ready.as_("analyst").get("/v1/releases/public-key").json()
    payload = verify(artifact, public["pem"])
    assert payload["job_id"] == job_id
    result = ready.as_("analyst").get(f"/v1/jobs/{job_id}/result").json()
    assert result["sha256"] == payload["sha256"]
    forged = copy.deepcopy(artifact)
    forged["payload"]["content"]["rows"][0]["count"]["value"] += 1
    with pytest.raises(ReleaseInvalid):
        verify(forged, public["pem"])
    # the CLI, as anyone would run it, with the key saved from the endpoint
    good, bad, key = tmp_path / "r.json", tmp_path / "bad.json", tmp_path / "key.pem"
    good.write_text(json.dumps(artifact))
    bad.write_text(json.dumps(forged))
    key.write_text(public["pem"])
    cli = [sys.executable, "-m", "sandbox.cli.main", "release", "verify"]
    ok = subprocess.run([*cli, str(good), "--public-key", str(key)], capture_output=True,
                        text=True)
    assert ok.returncode == 0 and "valid" in ok.stdout
    ko = subprocess.run([*cli, str(bad), "--public-key", str(key)], capture_output=True,
                        text=True)
    assert ko.returncode == 1 and "INVALID" in ko.stdout


def test_content_changed_after_approval_is_not_served(ready: Api) -> None:
    job_id = _released(ready)
    with ready.home.runtime.db.transaction() as session:
        row = session.scalar(select(JobResult).where(JobResult.job_id == job_id))
        assert row is not None
        content = copy.deepcopy(row.content)
        content["rows"][0]["count"]["value"] = 0
        row.content = content
    assert ready.as_("analyst").get(f"/v1/jobs/{job_id}/result").status_code == 404


def test_release_invisible_to_other_orgs_and_before_release(ready: Api) -> None:
    job_id = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY}).json()["id"]
    ready.home.worker().run_once()
    assert ready.as_("analyst").get(f"/v1/releases/{job_id}").status_code == 404
    assert ready.as_("owner").get(f"/v1/releases/{job_id}").status_code == 404


def test_two_person_rule(api: Api, demo_files) -> None:
    api.register(demo_files)
    api.approve_policy(POLICY_YAML.replace("review_required: true",
                                           "review_required: true\napprovals: 2"))
    with api.home.runtime.db.transaction() as session:
        user = create_user(session, "reviewer-two", org_name="provincial-review-office",
                           role=Role.REVIEWER, actor_id=None)
        api.home.tokens["reviewer2"] = issue_token(session, user, actor_id=None)
    job_id = api.as_("analyst").post("/v1/jobs", json={"query": QUERY}).json()["id"]
    api.home.worker().run_once()
    first = api.as_("reviewer").post(f"/v1/reviews/{job_id}/approve")
    assert first.status_code == 200 and first.json()["release"] is None
    assert api.as_("reviewer").post(f"/v1/reviews/{job_id}/approve").status_code == 409
    assert api.as_("analyst").get(f"/v1/jobs/{job_id}").json()["status"] == "pending_review"
    second = api.as_("reviewer2").post(f"/v1/reviews/{job_id}/approve")
    assert second.status_code == 200 and second.json()["release"]["key_id"]
    assert api.as_("analyst").get(f"/v1/jobs/{job_id}").json()["status"] == "released"


def test_reviewer_of_the_same_org_gets_403(ready: Api) -> None:
    with ready.home.runtime.db.transaction() as session:
        user = create_user(session, "reviewer-inside", org_name="suzhou-analytics",
                           role=Role.REVIEWER, actor_id=None)
        ready.home.tokens["inside"] = issue_token(session, user, actor_id=None)
    job_id = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY}).json()["id"]
    ready.home.worker().run_once()
    assert ready.as_("inside").post(f"/v1/reviews/{job_id}/approve").status_code == 403
    assert ready.as_("inside").get(f"/v1/reviews/{job_id}").status_code == 404


def test_checks_block_auto_release_of_row_level_tables(api: Api, demo_files) -> None:
    api.register(demo_files)
    api.approve_policy(POLICY_YAML.replace("review_required: true", "review_required: false"))
    ok = api.as_("analyst").post("/v1/jobs", json={"query": QUERY}).json()["id"]
    api.home.worker().run_once()
    assert api.as_("analyst").get(f"/v1/jobs/{ok}").json()["status"] == "released"
    result = api.as_("analyst").get(f"/v1/jobs/{ok}/result").json()
    assert {c["check"] for c in result["checks"]} >= {"float_precision"}


def test_checks_registry_findings() -> None:
    from sandbox.datasets.generator import enterprise_schema
    from sandbox.review.checks import blocked, run_checks
    schema = enterprise_schema(1000)
    content = {"kind": "script", "outputs": [
        {"name": "leak", "kind": "table",
         "payload": {"columns": ["enterprise_id", "x"],
                     "rows": [[f"E{i:010d}", 0.123456789012] for i in range(1500)]}},
        {"name": "sheet", "kind": "table",
         "payload": {"columns": ["city"], "rows": [["=HYPERLINK(\"http://x\")"]]}},
        {"name": "img", "kind": "figure", "payload": "not-a-png"}]}
    findings = run_checks(content, schema)
    checks = {(f["check"], f["severity"]) for f in findings}
    assert ("identifier_columns", "block") in checks and ("row_count", "block") in checks
    assert ("formula_cells", "warn") in checks and ("figures", "block") in checks
    assert blocked(findings)
    assert content["outputs"][1]["payload"]["rows"][0][0].startswith("'=")
    assert content["outputs"][0]["payload"]["rows"][0][1] == 0.123457
