"""The ledger under concurrency: exactly the budget is charged, never more.

50 charges of epsilon 0.1 race against a total of 1.0 from several processes, on SQLite
and on the machine's PostgreSQL: exactly 10 succeed.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pytest
from conftest import make_home

from sandbox.db import Database
from sandbox.db.models import Dataset, Job, Organisation, Policy, User
from sandbox.policies.model import Budget
from sandbox.privacy import ledger
from sandbox.privacy.units import Cost

BUDGET = Budget(total=1.0, per_job=1.0)


def _seed(db: Database, n_jobs: int) -> tuple[str, str, list[str]]:
    with db.transaction() as session:
        org = Organisation(name="org")
        session.add(org)
        session.flush()
        user = User(name="u", org_id=org.id, role="analyst")
        session.add(user)
        session.flush()
        ds = Dataset(name="d", title="d", owner_org_id=org.id, created_by=user.id)
        session.add(ds)
        session.flush()
        ledger.open_account(session, ds.id)
        policy = Policy(dataset_id=ds.id, version=1, body_yaml="", body={}, created_by=user.id)
        session.add(policy)
        session.flush()
        jobs = []
        for _ in range(n_jobs):
            job = Job(dataset_id=ds.id, dataset_version=1, org_id=org.id, submitted_by=user.id,
                      policy_id=policy.id, kind="query", spec={}, epsilon=0.1, status="running",
                      request_sha256="x")
            session.add(job)
            session.flush()
            jobs.append(job.id)
        return ds.id, org.id, jobs


def _charge_worker(url: str, dataset_id: str, org_id: str, job_ids: list[str],
                   start: mp.synchronize.Barrier, out: mp.Queue) -> None:  # type: ignore[name-defined]
    db = Database(url)
    start.wait()
    ok = refused = 0
    for job_id in job_ids:
        try:
            with db.transaction() as session:
                ledger.charge(session, dataset_id=dataset_id, org_id=org_id, job_id=job_id,
                              seq=0, cost=Cost.of(epsilon=0.1), budget=BUDGET)
            ok += 1
        except ledger.BudgetExhausted:
            refused += 1
    out.put((ok, refused))
    db.dispose()


def _race(url: str, processes: int = 5, n_jobs: int = 50) -> None:
    db = Database(url)
    db.migrate()
    dataset_id, org_id, jobs = _seed(db, n_jobs)
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(processes)
    out = ctx.Queue()
    share = [jobs[i::processes] for i in range(processes)]
    procs = [ctx.Process(target=_charge_worker, args=(url, dataset_id, org_id, s, barrier, out))
             for s in share]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert sum(r[0] for r in results) == 10
    assert sum(r[1] for r in results) == n_jobs - 10
    with db.transaction() as session:
        assert ledger.spent(session, dataset_id).in_unit("epsilon") == pytest.approx(1.0)
    db.dispose()


def test_concurrent_charges_sqlite(tmp_path: Path) -> None:
    _race(f"sqlite:///{tmp_path / 'ledger.db'}")


@pytest.mark.postgres
def test_concurrent_charges_postgres(pg_url: str) -> None:
    _race(pg_url)


def test_charge_is_idempotent_per_query(tmp_path: Path) -> None:
    home = make_home(tmp_path)
    db = home.runtime.db
    dataset_id, org_id, jobs = _seed(db, 1)
    for _ in range(3):
        with db.transaction() as session:
            charge = ledger.charge(session, dataset_id=dataset_id, org_id=org_id,
                                   job_id=jobs[0], seq=0, cost=Cost.of(epsilon=0.3),
                                   budget=BUDGET)
    assert charge.repeated
    with db.transaction() as session:
        assert ledger.spent(session, dataset_id).in_unit("epsilon") == pytest.approx(0.3)
    home.runtime.close()
