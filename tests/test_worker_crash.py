"""A worker killed with SIGKILL mid-job (attack catalogue 51, 54): the lease expires, a
new worker reruns the job, each query is charged once, and there is one result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import Api, make_home, missing_part
from sqlalchemy import func, select

from sandbox.db.models import BudgetCharge, Job, JobResult

SCRIPT = '''
import time
from sandbox.sdk import datasets, count, emit
a = datasets["enterprises"].agg(count()).release(epsilon=0.1)
b = datasets["enterprises"].group_by("city").agg(count()).release(epsilon=0.2)
time.sleep(4)
emit("done", "two queries")
'''


def _worker(home_dir: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SANDBOX_HOME": str(home_dir), "SANDBOX_LEASE_SECONDS": "2",
           "SANDBOX_WORKER_POLL_SECONDS": "0.1"}
    return subprocess.Popen([sys.executable, "-m", "sandbox.cli.main", "worker"], env=env,
                            start_new_session=True)


def _charges(api: Api) -> int:
    with api.home.runtime.db.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(BudgetCharge)) or 0)


def test_sigkill_mid_job_reruns_and_charges_once(tmp_path: Path, demo_files) -> None:
    if shutil.which("bwrap") is None:
        missing_part("bubblewrap")
    home = make_home(tmp_path)
    api = Api(home)
    api.register(demo_files)
    api.approve_policy()
    response = api.as_("analyst").post("/v1/jobs", json={
        "kind": "script", "script": {"dataset": "enterprises", "source": SCRIPT}})
    job_id = response.json()["id"]
    first = _worker(home.settings.home)
    deadline = time.monotonic() + 60
    while _charges(api) < 2:
        assert time.monotonic() < deadline, "the first worker never charged both queries"
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and everything it started
    first.wait()
    second = _worker(home.settings.home)
    try:
        deadline = time.monotonic() + 90
        while True:
            status = api.as_("analyst").get(f"/v1/jobs/{job_id}").json()
            if status["status"] in ("pending_review", "failed"):
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert status["status"] == "pending_review", status
    assert status["attempts"] == 2
    assert _charges(api) == 2
    spent = api.as_("analyst").get("/v1/budget/enterprises").json()["spent"]
    assert abs(spent - 0.3) < 1e-9
    with home.runtime.db.transaction() as session:
        assert session.scalar(select(func.count()).select_from(JobResult)) == 1
        job = session.get(Job, job_id)
        assert job is not None and job.lease_owner is None
    leftovers = subprocess.run(["pgrep", "-f", "time.sleep(4)"], capture_output=True)
    assert leftovers.stdout.strip() == b""
    home.runtime.close()
