"""Submitting, reading and cancelling jobs: every check here is data-independent.

``submit_query_job`` refuses, before anything is queued, a dataset without an approved
policy, an organisation the policy does not grant, a query the schema or policy does not
allow, and an epsilon over the per-job cap or over what is left. The job pins the dataset
version and the policy version in force at submission.
"""

from __future__ import annotations

import hashlib
import json
from datetime import date, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import Select, false, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sandbox.audit import record
from sandbox.datasets import catalog
from sandbox.db.models import (
    Dataset,
    DatasetVersion,
    Job,
    Organisation,
    Policy,
    as_utc,
    utcnow,
)
from sandbox.errors import Conflict, Invalid, NotFound, SandboxError
from sandbox.identity.service import Principal, Role
from sandbox.jobs.screen import screen
from sandbox.jobs.states import JobStatus, transition
from sandbox.policies.model import PolicyDocument
from sandbox.policies.service import document, policy_in_force
from sandbox.privacy import engine, ledger
from sandbox.privacy.spec import QuerySpec
from sandbox.privacy.sql import compile_sql
from sandbox.privacy.units import Cost
from sandbox.privacy.validate import check_grant, check_query


class SqlQuery(BaseModel):
    """DP-SQL text and its privacy cost (the cost is never written in the SQL)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    text: str = Field(min_length=1, max_length=20_000,
                      examples=["SELECT city, COUNT(*), SUM(annual_revenue) FROM enterprises "
                                "WHERE industry = 'manufacturing' GROUP BY city"])
    epsilon: float | None = None
    rho: float | None = None
    delta: float | None = None
    keys: Literal["public", "dp"] = "public"


class ScriptRequest(BaseModel):
    """An analyst's Python script for one dataset; ``mock`` runs it on mock data."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    dataset: str = Field(min_length=1, max_length=64)
    source: str = Field(min_length=1, max_length=256 * 1024)
    mode: Literal["real", "mock"] = "real"


class JobRequest(BaseModel):
    """What an analyst posts to ``/v1/jobs``: a query spec, DP-SQL that compiles to one, or
    a script."""

    model_config = ConfigDict(frozen=True, extra="forbid", json_schema_extra={"examples": [
        {"kind": "query", "sql": {"text": "SELECT city, COUNT(*) FROM enterprises "
                                          "GROUP BY city", "epsilon": 0.3}},
        {"kind": "script", "script": {"dataset": "enterprises", "mode": "mock", "source":
                                      "from sandbox.sdk import datasets, count, emit\n"
                                      "emit('n', datasets['enterprises'].agg(count())"
                                      ".release(epsilon=0.1))"}}]})
    kind: Literal["query", "script"] = "query"
    query: QuerySpec | None = None
    sql: SqlQuery | None = None
    script: ScriptRequest | None = None

    @model_validator(mode="after")
    def _one(self) -> JobRequest:
        given = [name for name in ("query", "sql", "script") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError("give exactly one of 'query' (a spec), 'sql' or 'script'")
        if (self.kind == "script") != (self.script is not None):
            raise ValueError("kind 'script' goes with 'script', kind 'query' with 'query'/'sql'")
        return self

    def spec(self) -> QuerySpec:
        """The query spec (DP-SQL is compiled; errors point at the SQL clause)."""
        if self.query is not None:
            return self.query
        assert self.sql is not None
        return compile_sql(self.sql.text, epsilon=self.sql.epsilon, rho=self.sql.rho,
                           delta=self.sql.delta, keys=self.sql.keys)


def request_digest(request: JobRequest) -> str:
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_query_job(session: Session, principal: Principal, request: JobRequest, *,
                     idempotency_key: str | None = None, today: date | None = None) -> Job:
    """Queue a query job, or return the job an earlier identical submission created."""
    if principal.role != Role.ANALYST:
        raise Invalid("only analysts submit jobs")
    digest = request_digest(request)
    if idempotency_key is not None:
        existing = session.scalar(select(Job).where(Job.org_id == principal.org_id,
                                                    Job.idempotency_key == idempotency_key))
        if existing is not None:
            if existing.request_sha256 != digest:
                raise Invalid("Idempotency-Key was already used with a different request body")
            return existing
    if request.script is not None:
        return _submit_script(session, principal, request, digest, idempotency_key,
                              today or date.today())
    spec = request.spec()
    dataset, policy, doc, version = governing(session, principal, spec.dataset,
                                              today or date.today())
    schema = catalog.schema_of(version)
    check_query(spec, schema, doc)
    if doc.mode == "dp":
        engine.plan(spec, schema)  # refuses, before queueing, what could never be planned
        # a public pre-check of the budget; the worker's charge is the atomic one
        charge = Cost.of(epsilon=spec.epsilon, rho=spec.rho).in_unit(doc.budget.unit)
        left = ledger.summary(session, dataset.id, doc.budget, principal.org_id)
        org_left = left["organisation"]["left"]  # type: ignore[index]
        if charge.amount > float(left["left"]) + ledger.TOLERANCE:  # type: ignore[arg-type]
            raise Conflict(f"budget exhausted: {charge.amount:g} {doc.budget.unit} requested, "
                           f"{left['left']:g} left")
        if charge.amount > org_left + ledger.TOLERANCE:
            raise Conflict(f"budget exhausted for your organisation: {charge.amount:g} "
                           f"{doc.budget.unit} requested, {org_left:g} left")
    job = Job(dataset_id=dataset.id, dataset_version=version.version, org_id=principal.org_id,
              submitted_by=principal.user_id, policy_id=policy.id, kind="query",
              spec=spec.model_dump(mode="json"), epsilon=spec.epsilon, rho=spec.rho,
              status=JobStatus.QUEUED.value, review_required=doc.review_required,
              idempotency_key=idempotency_key, request_sha256=digest)
    return _insert(session, principal, job, dataset.name, digest, idempotency_key)


def governing(session: Session, principal: Principal, dataset_name: str,
              today: date) -> tuple[Dataset, Policy, PolicyDocument, DatasetVersion]:
    """The dataset, the policy in force (refusing if none), its document, and the latest
    version, after checking that the caller's organisation is granted access. Admins and
    reviewers (who never query) are not checked against grants."""
    dataset = catalog.get_dataset(session, dataset_name)
    policy = policy_in_force(session, dataset.id)
    if policy is None:
        raise Conflict(f"dataset {dataset.name!r} has no approved policy; no query can run")
    doc = document(policy)
    if principal.role in (Role.ANALYST, Role.OWNER):
        org = session.get(Organisation, principal.org_id)
        if principal.role == Role.ANALYST or (org and org.id != dataset.owner_org_id):
            check_grant(doc, org.name if org else "", today)
    return dataset, policy, doc, catalog.latest_version(session, dataset)


def _submit_script(session: Session, principal: Principal, request: JobRequest, digest: str,
                   idempotency_key: str | None, today: date) -> Job:
    """Screen the script (422 naming the line) and queue it; queries are charged as the
    script sends them, each against the policy's limits."""
    script = request.script
    assert script is not None
    screen(script.source)
    dataset, policy, doc, version = governing(session, principal, script.dataset, today)
    if doc.mode == "sdc":
        raise Invalid("this dataset's policy uses disclosure control: submit query jobs, "
                      "not scripts")
    job = Job(dataset_id=dataset.id, dataset_version=version.version, org_id=principal.org_id,
              submitted_by=principal.user_id, policy_id=policy.id, kind="script",
              spec={"dataset": dataset.name, "source": script.source, "mode": script.mode},
              epsilon=None, rho=None, status=JobStatus.QUEUED.value,
              review_required=doc.review_required and script.mode == "real",
              idempotency_key=idempotency_key, request_sha256=digest)
    return _insert(session, principal, job, dataset.name, digest, idempotency_key)


def _insert(session: Session, principal: Principal, job: Job, dataset_name: str, digest: str,
            idempotency_key: str | None) -> Job:
    if idempotency_key is not None:
        try:
            with session.begin_nested():  # a concurrent twin may insert the same key first
                session.add(job)
                session.flush()
        except IntegrityError:
            existing = session.scalar(select(Job).where(Job.org_id == principal.org_id,
                                                        Job.idempotency_key == idempotency_key))
            if existing is None or existing.request_sha256 != digest:
                raise Invalid("Idempotency-Key was already used with a different request "
                              "body") from None
            return existing
    else:
        session.add(job)
        session.flush()
    record(session, actor_id=principal.user_id, action="job.submitted", object_type="job",
           object_id=job.id, detail={"dataset": dataset_name, "kind": job.kind,
                                     "epsilon": job.epsilon, "rho": job.rho})
    return job


def visible_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The job if the caller may see it; otherwise ``NotFound`` (same as missing).

    Analysts see their organisation's jobs; reviewers see jobs of other organisations
    (the ones they may review); admins see all.
    """
    job = session.get(Job, job_id)
    if job is None or not can_see_job(principal, job):
        raise NotFound(f"job {job_id!r} not found")
    return job


class QuotaExceeded(SandboxError):
    """Too many submissions or pending jobs for the organisation (HTTP 429)."""

    status_code = 429


def has_key(session: Session, principal: Principal, idempotency_key: str) -> bool:
    """A retry with a known key is answered, never throttled."""
    return session.scalar(select(Job.id).where(Job.org_id == principal.org_id,
                                               Job.idempotency_key == idempotency_key)) \
        is not None


def check_quota(session: Session, principal: Principal, *, per_minute: int,
                pending: int) -> None:
    """Per-organisation flood control: submissions per minute and unfinished jobs."""
    since = utcnow() - timedelta(minutes=1)
    recent = session.scalar(select(func.count()).select_from(Job).where(
        Job.org_id == principal.org_id, Job.created_at >= since)) or 0
    if recent >= per_minute:
        raise QuotaExceeded(f"your organisation submitted {recent} jobs in the last minute "
                            f"(limit {per_minute}); retry later")
    unfinished = session.scalar(select(func.count()).select_from(Job).where(
        Job.org_id == principal.org_id,
        Job.status.in_([JobStatus.QUEUED.value, JobStatus.RUNNING.value,
                        JobStatus.PENDING_REVIEW.value]))) or 0
    if unfinished >= pending:
        raise QuotaExceeded(f"your organisation has {unfinished} unfinished jobs (limit "
                            f"{pending}); wait for some to finish")


def visible_jobs_query(principal: Principal) -> Select[Any]:
    """The jobs ``principal`` may see, as a query (the same rule as ``can_see_job``)."""
    query = select(Job)
    if principal.role == Role.ADMIN:
        return query
    if principal.role == Role.REVIEWER:
        return query.where(Job.org_id != principal.org_id)
    if principal.role == Role.ANALYST:
        return query.where(Job.org_id == principal.org_id)
    return query.where(false())


def can_see_job(principal: Principal, job: Job) -> bool:
    if principal.role == Role.ADMIN:
        return True
    if principal.role == Role.REVIEWER:
        return job.org_id != principal.org_id
    if principal.role == Role.ANALYST:
        return job.org_id == principal.org_id
    return False


def cancel(session: Session, principal: Principal, job: Job) -> Job:
    """Cancel a job of the caller's organisation; its budget charge (if any) stays."""
    if principal.role != Role.ANALYST or job.org_id != principal.org_id:
        raise NotFound(f"job {job.id!r} not found")
    transition(session, job, JobStatus.CANCELLED, actor="analyst", actor_id=principal.user_id)
    return job


def job_view(job: Job) -> dict[str, Any]:
    """The public view of a job (no result content)."""
    return {
        "id": job.id, "status": job.status, "kind": job.kind, "dataset_version":
        job.dataset_version, "epsilon": job.epsilon, "query": job.spec,
        "review_required": job.review_required, "error": job.error_public,
        "attempts": job.attempts, "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at),
    }


def _iso(value: datetime | None) -> str | None:
    """UTC timestamps with an explicit offset, whichever database they came from."""
    moment = as_utc(value)
    return moment.isoformat() if moment else None
