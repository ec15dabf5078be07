"""The data owner's and operator's CLI over real HTTP: register with progress, the
catalog (no exact row count for analysts), and key rotation while the server runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import POLICY_YAML, QUERY
from test_e2e_http import server  # noqa: F401  (the fixture: `sandbox serve` on a port)

from sandbox.cli.client import SandboxClient


def _cli(*args: str, token: str, url: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SANDBOX_URL": url, "SANDBOX_TOKEN": token,
           "SANDBOX_HOME": str(home), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "sandbox.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_register_catalog_and_rotation_through_the_cli(server, demo_files,  # noqa: F811
                                                       tmp_path: Path) -> None:
    url, tokens = server
    home = tmp_path / "home"  # the server fixture's home (same tmp_path)
    data, schema = demo_files
    owner = SandboxClient(url, tokens["owner"])

    sent: list[int] = []  # what drives the CLI's progress bar
    detail = owner.register_dataset(schema, data, progress=sent.append)
    size = data.stat().st_size
    assert sent and sent == sorted(sent) and sent[-1] == size and len(sent) >= 1
    assert detail["versions"][0]["row_count"] == 20_000  # the owner sees the exact count

    # the CLI's own register command: a new version, exit 0, JSON on stdout
    registered = _cli("dataset", "register", str(schema), str(data), token=tokens["owner"],
                      url=url, home=home)
    assert registered.returncode == 0, registered.stderr
    assert [v["version"] for v in json.loads(registered.stdout)["versions"]] == [1, 2]

    listed = _cli("dataset", "list", token=tokens["analyst"], url=url, home=home)
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert entry["name"] == "enterprises"
    shown = _cli("dataset", "show", "enterprises", token=tokens["analyst"], url=url, home=home)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert {c["name"] for c in view["schema"]["columns"]} >= {"city", "annual_revenue"}
    assert [v["row_count"] for v in view["versions"]] == [None, None]  # not public
    missing = _cli("dataset", "show", "nope", token=tokens["analyst"], url=url, home=home)
    assert missing.returncode == 1 and "404" in missing.stdout

    before = _cli("keys", "list", token="", url=url, home=home)
    assert before.returncode == 0 and "(current): wraps 2 data key(s)" in before.stdout
    rotated = _cli("keys", "rotate", "--retire", token="", url=url, home=home)
    assert rotated.returncode == 0, rotated.stderr
    assert "rewrapped 2 data key(s)" in rotated.stdout and "retired ['" in rotated.stdout
    after = _cli("keys", "list", token="", url=url, home=home)
    assert after.stdout.count("wraps") == 1 and "(current): wraps 2" in after.stdout

    # the running server's worker answers with the new key
    owner.approve_policy("enterprises", owner.draft_policy("enterprises", POLICY_YAML)["version"])
    analyst = SandboxClient(url, tokens["analyst"])
    job = analyst.wait(analyst.submit_query(QUERY)["id"], timeout=120)
    assert job["status"] == "pending_review", job
