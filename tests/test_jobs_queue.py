"""Queue contract: leases, expiry, fencing, dead-lettering; states as data."""

from __future__ import annotations

from datetime import timedelta

import pytest
from conftest import QUERY, Api

from sandbox.db.models import Job, utcnow
from sandbox.jobs.queue import LeaseLost, claim, fenced, heartbeat
from sandbox.jobs.states import (
    TRANSITIONS,
    JobStatus,
    TransitionError,
    can_transition,
    check_transition,
)


def _submit(api: Api) -> str:
    response = api.as_("analyst").post("/v1/jobs", json={"query": QUERY})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _expire(api: Api, job_id: str) -> None:
    with api.home.runtime.db.transaction() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.lease_expires_at = utcnow() - timedelta(seconds=1)


def test_claim_gives_one_job_to_one_worker(ready: Api) -> None:
    _submit(ready)
    db = ready.home.runtime.db
    first = claim(db, "w1", lease_seconds=30, max_attempts=3)
    assert first is not None and first.attempt == 1
    assert claim(db, "w2", lease_seconds=30, max_attempts=3) is None


def test_expired_lease_requeues_and_fences_old_worker(ready: Api) -> None:
    job_id = _submit(ready)
    db = ready.home.runtime.db
    old = claim(db, "w1", lease_seconds=30, max_attempts=3)
    assert old is not None
    _expire(ready, job_id)
    new = claim(db, "w2", lease_seconds=30, max_attempts=3)
    assert new is not None and new.job_id == job_id and new.token > old.token
    with pytest.raises(LeaseLost), fenced(db, old):
        pass
    with pytest.raises(LeaseLost):
        heartbeat(db, old, lease_seconds=30)
    heartbeat(db, new, lease_seconds=30)


def test_dead_letter_after_max_attempts(ready: Api) -> None:
    job_id = _submit(ready)
    db = ready.home.runtime.db
    for _ in range(2):
        assert claim(db, "w", lease_seconds=30, max_attempts=2) is not None
        _expire(ready, job_id)
    assert claim(db, "w", lease_seconds=30, max_attempts=2) is None
    status = ready.as_("analyst").get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "failed" and "dead-lettered" in status["error"]


def test_rerun_after_lease_loss_charges_once(ready: Api) -> None:
    job_id = _submit(ready)
    db = ready.home.runtime.db
    claim(db, "crashed", lease_seconds=30, max_attempts=3)
    _expire(ready, job_id)
    assert ready.home.worker().run_once()
    status = ready.as_("analyst").get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "pending_review" and status["attempts"] == 2
    assert ready.as_("analyst").get("/v1/budget/enterprises").json()["spent"] == 0.5


def test_cancel_running_job_drops_its_result(ready: Api) -> None:
    job_id = _submit(ready)
    db = ready.home.runtime.db
    held = claim(db, "w", lease_seconds=30, max_attempts=3)
    assert held is not None
    assert ready.as_("analyst").post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    with pytest.raises(LeaseLost), fenced(db, held):
        pass


def test_transition_table() -> None:
    assert can_transition("queued", JobStatus.RUNNING, "worker")
    assert not can_transition("queued", JobStatus.RUNNING, "analyst")
    assert not can_transition("released", JobStatus.REJECTED, "reviewer")
    with pytest.raises(TransitionError):
        check_transition("pending_review", JobStatus.RELEASED, "analyst")
    for (source, target), rule in TRANSITIONS.items():
        assert source != target and rule.event.startswith("job.")


def test_failed_job_keeps_its_charge(ready: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox.privacy import engine

    def broken(*_args: object, **_kwargs: object) -> None:
        raise engine.EngineError("boom on the data")

    monkeypatch.setattr(engine, "execute", broken)
    job_id = _submit(ready)
    ready.home.worker().run_once()
    status = ready.as_("analyst").get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "failed"
    assert "boom" not in status["error"] and "budget stays charged" in status["error"]
    assert ready.as_("analyst").get("/v1/budget/enterprises").json()["spent"] == 0.5


def test_budget_exhaustion_fails_closed(ready: Api) -> None:
    # all accepted while budget was left; the organisation's cap is 3.0 = 6 x 0.5
    ids = [_submit(ready) for _ in range(8)]
    worker = ready.home.worker()
    while worker.run_once():
        pass
    statuses = [ready.as_("analyst").get(f"/v1/jobs/{i}").json() for i in ids]
    assert [s["status"] for s in statuses].count("pending_review") == 6
    failed = [s for s in statuses if s["status"] == "failed"]
    assert len(failed) == 2
    assert all("budget exhausted for your organisation" in f["error"] for f in failed)
    response = ready.as_("analyst").post("/v1/jobs", json={"query": QUERY})
    assert response.status_code == 409 and "budget exhausted" in response.json()["detail"]


def test_last_affordable_job_is_answered_despite_float_drift(api: Api, demo_files) -> None:
    from conftest import POLICY_YAML
    api.register(demo_files)
    policy = POLICY_YAML
    for field in ("total: 5.0", "per_job: 1.0", "per_query: 1.0", "per_organisation: 3.0"):
        policy = policy.replace(field, field.split(":")[0] + ": 0.3")
    api.approve_policy(policy)
    ids = [api.as_("analyst").post("/v1/jobs", json={"query": {**QUERY, "epsilon": 0.1}})
           .json()["id"] for _ in range(3)]
    worker = api.home.worker()
    while worker.run_once():
        pass
    statuses = [api.as_("analyst").get(f"/v1/jobs/{i}").json()["status"] for i in ids]
    assert statuses == ["pending_review"] * 3
