"""The worker: claims jobs, charges the ledger, runs the broker, stores the result.

The worker is trusted code. For a query job it:
1. reads the job, its pinned dataset version and policy (short transaction);
2. builds the measurement from the spec (data-independent);
3. charges the ledger in a fenced transaction *before* touching data; a refusal there
   fails the job with the ledger's public message;
4. runs the measurement over the dataset, decrypted (and authenticated) into a RAM buffer
   of its cache before the charge and scanned there in place; any failure from here on is
   data-dependent and becomes one generic message, and the charge stays;
5. stores the result and moves the job to review (or releases it when the policy needs no
   review), fenced by its lease token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import func, select

from sandbox.config import Settings
from sandbox.datasets import catalog, store
from sandbox.datasets.cache import DecryptedCache, envelope_loader, reap_orphans
from sandbox.datasets.keyring import Keyring
from sandbox.datasets.keys import KeyUnavailable
from sandbox.datasets.plaintext import PlainBuffer
from sandbox.datasets.schema import DatasetSchema
from sandbox.db import Database
from sandbox.db.models import Dataset, DatasetVersion, Job, JobResult, Policy
from sandbox.errors import SandboxError
from sandbox.jobs import scripts
from sandbox.jobs.queue import Claim, LeaseLost, claim, fenced, heartbeat
from sandbox.jobs.states import JobStatus, transition
from sandbox.policies.model import PolicyDocument
from sandbox.privacy import engine, ledger, sdc_engine
from sandbox.privacy.broker import pad_to_quantum
from sandbox.privacy.mechanisms import DatasetHandle, open_session
from sandbox.privacy.spec import QuerySpec
from sandbox.review.checks import blocked, run_checks
from sandbox.review.service import content_digest, create_release
from sandbox.runner.contract import Executor, IsolationUnavailable
from sandbox.runner.factory import make_executor
from sandbox.runtime import release_signer

log = logging.getLogger("sandbox.worker")

GENERIC_FAILURE = ("the query could not be answered on the data; its budget stays charged "
                   "(data-dependent failures are not described)")


class Worker:
    """One worker process's loop. ``run_once`` is safe to call from tests."""

    def __init__(self, settings: Settings, db: Database, keys: Keyring,
                 worker_id: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.keys = keys
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self.cache = DecryptedCache(settings.decrypted_cache_bytes)
        self._runner: Executor | None = None
        self.signer = release_signer(settings)
        reap_orphans(settings.tmpfs_dir)

    def stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        log.info("worker %s started", self.worker_id)
        warm = threading.Thread(target=self.reserve_cache_memory, name="cache-reserve",
                                daemon=True)
        warm.start()
        try:
            while not self._stop.is_set():
                try:
                    worked = self.run_once()
                except Exception:  # keep the worker alive; the job's lease will expire
                    log.exception("worker loop error")
                    worked = False
                if not worked:
                    self._stop.wait(self.settings.worker_poll_seconds)
        finally:
            warm.join()
            self.cache.clear()
            self.signer.close()
            if self._runner is not None:
                self._runner.close()

    def reserve_cache_memory(self) -> int:
        """Fault in cache memory for the largest live dataset version (if it fits the
        cache), so that this worker's first job does not pay for touching fresh memory.
        Returns the bytes reserved. Run in the background when the worker starts; a
        failure is logged, never raised (it only costs speed)."""
        try:
            with self.db.read() as session:
                largest = session.scalar(
                    select(func.max(DatasetVersion.plaintext_bytes))
                    .join(Dataset, Dataset.id == DatasetVersion.dataset_id)
                    .where(DatasetVersion.wrapped_key.is_not(None),
                           Dataset.deleted_at.is_(None))) or 0
            if largest and self.cache.reserve(largest):
                log.info("worker %s: reserved %d MB of decrypted-cache memory",
                         self.worker_id, largest // 2**20)
                return int(largest)
        except Exception:
            log.exception("reserving decrypted-cache memory failed")
        return 0

    def run_once(self) -> bool:
        """Claim and process one job; ``False`` if the queue was empty."""
        claimed = claim(self.db, self.worker_id, lease_seconds=self.settings.lease_seconds,
                        max_attempts=self.settings.max_attempts)
        if claimed is None:
            return False
        try:
            self._process(claimed)
        except LeaseLost:
            log.warning("job %s: lease lost, result dropped", claimed.job_id)
        return True

    def _process(self, claimed: Claim) -> None:
        with self.db.transaction() as session:
            job = session.get(Job, claimed.job_id)
            assert job is not None
            kind = job.kind
            version = session.scalar(select(DatasetVersion).where(
                DatasetVersion.dataset_id == job.dataset_id,
                DatasetVersion.version == job.dataset_version))
            policy = session.get(Policy, job.policy_id)
            assert version is not None and policy is not None
            doc = PolicyDocument.model_validate(policy.body)
            raw_spec = dict(job.spec)
        schema = catalog.schema_of(version)
        if kind == "script":
            self._process_script(claimed, raw_spec, version, schema, doc)
            return
        spec = QuerySpec.model_validate(raw_spec)
        try:
            plan = engine.plan(spec, schema, min_group_size=doc.queries.min_group_size) \
                if doc.mode == "dp" else None
        except Exception:
            log.exception("job %s: could not plan the query", claimed.job_id)
            self._fail(claimed, "the query could not be planned; nothing was charged")
            return
        with contextlib.ExitStack() as pinned:
            try:  # keys and integrity are not data: failures here come before any charge
                plain = pinned.enter_context(self._plaintext(version))
            except KeyUnavailable as exc:
                log.error("job %s: %s", claimed.job_id, exc)
                self._fail(claimed, "the dataset's key is not available (deleted dataset or "
                                    "missing master key); nothing was charged")
                return
            except store.IntegrityError as exc:
                log.error("job %s: %s", claimed.job_id, exc)
                self._fail(claimed, "the stored dataset failed its integrity check; nothing "
                                    "was charged (operator: restore it from backup)")
                return
            self._charge_and_run(claimed, plan, spec, schema, doc, plain)

    def _charge_and_run(self, claimed: Claim, plan: engine.Plan | None, spec: QuerySpec,
                        schema: DatasetSchema, doc: PolicyDocument, plain: PlainBuffer) -> None:
        left = (0.0, 0.0)
        if plan is not None:
            try:
                with fenced(self.db, claimed) as (session, job):
                    left = ledger.left_for(session, dataset_id=job.dataset_id,
                                           org_id=job.org_id, job_id=job.id,
                                           budget=doc.budget)
                    ledger.charge(session, dataset_id=job.dataset_id, org_id=job.org_id,
                                  job_id=job.id, seq=0, cost=plan.cost, budget=doc.budget)
            except ledger.BudgetExhausted as exc:
                self._fail(claimed, str(exc))
                return
        try:
            content = self._run(claimed, plan, spec, schema, doc, plain, left)
        except LeaseLost:
            raise
        except Exception:
            log.error("job %s: data-dependent failure (details withheld)", claimed.job_id)
            self._fail(claimed, GENERIC_FAILURE)
            return
        self._complete(claimed, content)

    @contextlib.contextmanager
    def _plaintext(self, version: DatasetVersion) -> Iterator[PlainBuffer]:
        """The decrypted dataset, pinned in the cache for the block. On a miss: unwrap the
        data key, check the envelope, authenticate and decrypt every chunk into a RAM
        buffer (a failing chunk wipes it); nothing reaches the engine before that."""
        if version.wrapped_key is None:  # shredded: a cached copy must not outlive the key
            raise KeyUnavailable(f"dataset {version.dataset_id} version {version.version}: "
                                 "data key destroyed (dataset deleted)")

        load = envelope_loader(self.settings.data_dir / version.storage_file,
                               lambda: catalog.unwrap_data_key(version, self.keys),
                               dataset_id=version.dataset_id, version=version.version)
        key = (version.dataset_id, version.version, version.ciphertext_sha256)
        with self.cache.use(key, load) as plain:
            yield plain

    def _run(self, claimed: Claim, plan: engine.Plan | None, spec: QuerySpec,
             schema: DatasetSchema, doc: PolicyDocument, plain: PlainBuffer,
             left: tuple[float, float]) -> dict[str, Any]:
        started = time.monotonic()
        with self._keep_lease(claimed):
            handle = DatasetHandle(plain)
            if plan is None:
                content = sdc_engine.execute(spec, schema, doc.sdc, handle)
            else:
                approximate = doc.budget.total_delta > 0
                session = open_session(handle, unit=doc.budget.unit, approximate=approximate,
                                       d_in=plan.d_in, left=left[0], delta_left=left[1])
                content = engine.execute(plan, session, handle, approximate=approximate,
                                         budget_unit=doc.budget.unit)
        pad_to_quantum(started, doc.timing_quantum_ms)
        log.info("job %s answered in %.2fs", claimed.job_id, time.monotonic() - started)
        return content

    def _process_script(self, claimed: Claim, raw: dict[str, Any], version: DatasetVersion,
                        schema: DatasetSchema, doc: PolicyDocument) -> None:
        try:
            executor = self._executor()
        except IsolationUnavailable as exc:
            self._fail(claimed, f"script jobs are refused here: {exc}")
            return
        mode, source, dataset = raw["mode"], raw["source"], raw["dataset"]
        if mode == "mock":
            with self._keep_lease(claimed):
                outcome = scripts.run_mock(executor, job_id=claimed.job_id, source=source,
                                           dataset=dataset, schema=schema, doc=doc,
                                           tmpfs_dir=self.settings.tmpfs_dir)
            self._finish_script(claimed, outcome, mode)
            return
        with contextlib.ExitStack() as pinned:
            try:
                plain = pinned.enter_context(self._plaintext(version))
            except (KeyUnavailable, store.IntegrityError) as exc:
                log.error("job %s: %s", claimed.job_id, exc)
                self._fail(claimed, "the dataset is not available (key or integrity); "
                                    "nothing was charged")
                return
            outcome = self._run_script(claimed, executor, raw, schema, doc, plain)
        self._finish_script(claimed, outcome, mode)

    def _run_script(self, claimed: Claim, executor: Executor, raw: dict[str, Any],
                    schema: DatasetSchema, doc: PolicyDocument, plain: PlainBuffer) -> Any:
        with self.db.transaction() as session:
            job = session.get(Job, claimed.job_id)
            assert job is not None
            left = ledger.left_for(session, dataset_id=job.dataset_id, org_id=job.org_id,
                                   job_id=job.id, budget=doc.budget)

        def charge(seq: int, cost: Any) -> None:
            with fenced(self.db, claimed) as (session, job):
                ledger.charge(session, dataset_id=job.dataset_id, org_id=job.org_id,
                              job_id=job.id, seq=seq, cost=cost, budget=doc.budget)

        # run_real takes a path: the memfd's /proc/self/fd path, valid in this process
        # only (the script's sandbox never inherits the descriptor: close-on-exec)
        with self._keep_lease(claimed):
            return scripts.run_real(executor, job_id=claimed.job_id, source=raw["source"],
                                    dataset=raw["dataset"], schema=schema, doc=doc,
                                    parquet=plain.proc_path, left=left, charge=charge)

    def _finish_script(self, claimed: Claim, outcome: Any, mode: str) -> None:
        if outcome.reason != "ok":
            self._fail(claimed, f"the script ended: {outcome.reason}; its outputs and logs "
                                "are withheld, any budget it spent stays charged")
            return
        self._complete(claimed, scripts.content_of(outcome, mode))

    def _executor(self) -> Executor:
        if self._runner is None:
            runner = make_executor(self.settings)
            runner.check_available()
            swept = runner.sweep()  # what workers of this host that died left behind
            if swept:
                log.info("swept %d leftovers of dead workers (%s)", swept, runner.name)
            self._runner = runner
        return self._runner

    @contextlib.contextmanager
    def _keep_lease(self, claimed: Claim) -> Iterator[None]:
        """Renew the lease every third of its length while a long query runs."""
        done = threading.Event()
        interval = max(self.settings.lease_seconds / 3, 0.05)

        def renew() -> None:
            while not done.wait(interval):
                try:
                    heartbeat(self.db, claimed, lease_seconds=self.settings.lease_seconds)
                except LeaseLost:
                    return
                except Exception:  # a transient database error: try again next time
                    log.warning("job %s: heartbeat failed", claimed.job_id)

        heartbeat(self.db, claimed, lease_seconds=self.settings.lease_seconds)
        thread = threading.Thread(target=renew, name=f"lease-{claimed.job_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _complete(self, claimed: Claim, content: dict[str, Any]) -> None:
        with fenced(self.db, claimed) as (session, job):
            policy = session.get(Policy, job.policy_id)
            assert policy is not None
            budget = PolicyDocument.model_validate(policy.body).budget
            content = {**content, "budget": ledger.summary(session, job.dataset_id, budget,
                                                           job.org_id)}
            version = session.scalar(select(DatasetVersion).where(
                DatasetVersion.dataset_id == job.dataset_id,
                DatasetVersion.version == job.dataset_version))
            assert version is not None
            findings = run_checks(content, catalog.schema_of(version))
            content = {**content, "checks": findings}
            session.add(JobResult(job_id=job.id, content=content,
                                  content_sha256=content_digest(content)))
            session.flush()
            job.lease_owner, job.lease_expires_at = None, None
            if job.review_required or blocked(findings):
                transition(session, job, JobStatus.PENDING_REVIEW, actor="worker", actor_id=None,
                           detail={"blocked_by_checks": blocked(findings)})
            else:
                transition(session, job, JobStatus.RELEASED, actor="worker", actor_id=None)
                create_release(session, job, released_by=None, signer=self.signer)

    def _fail(self, claimed: Claim, public_message: str) -> None:
        try:
            with fenced(self.db, claimed) as (session, job):
                job.error_public = public_message
                job.lease_owner, job.lease_expires_at = None, None
                transition(session, job, JobStatus.FAILED, actor="worker", actor_id=None,
                           detail={"reason": public_message})
        except SandboxError:
            log.exception("job %s: could not record failure", claimed.job_id)
