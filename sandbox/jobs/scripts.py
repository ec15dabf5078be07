"""Script jobs in the worker: run the analyst's script in the sandbox, broker its queries.

For a real run each query is validated against the schema and the policy, charged to the
ledger under the job's id and the query's sequence number (a rerun after a crash is not
charged twice), and answered by the engine through the job's OpenDP session, which was
opened over the decrypted dataset and sized to what the ledger says the job may still
spend. A mock run answers from mock data generated from the schema alone and charges
nothing. Outputs and logs come back only through the channel.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import ValidationError

from sandbox.datasets.mock import generate_mock
from sandbox.datasets.schema import DatasetSchema
from sandbox.errors import Invalid
from sandbox.policies.model import PolicyDocument, format_validation_error
from sandbox.privacy import engine, ledger
from sandbox.privacy.mechanisms import DatasetHandle, open_session
from sandbox.privacy.spec import QuerySpec
from sandbox.privacy.validate import check_query
from sandbox.runner.contract import Executor, Limits, SandboxRequest
from sandbox.runner.session import ScriptOutcome, run_script

MOCK_ROWS = 10_000


def limits_of(doc: PolicyDocument) -> Limits:
    s = doc.scripts
    return Limits(wall_seconds=s.wall_seconds, cpu_seconds=s.cpu_seconds,
                  memory_bytes=s.memory_mb * 1024 * 1024, processes=s.processes,
                  output_bytes=s.output_bytes, queries=s.queries)


def _spec(raw: dict[str, Any], dataset: str, schema: DatasetSchema,
          doc: PolicyDocument) -> QuerySpec:
    try:
        spec = QuerySpec.model_validate(raw)
    except ValidationError as exc:
        raise Invalid(f"bad query: {format_validation_error(exc, 'query')}") from None
    if spec.dataset != dataset:
        raise Invalid(f"this job may query dataset {dataset!r} only")
    check_query(spec, schema, doc)
    return spec


def run_real(executor: Executor, *, job_id: str, source: str, dataset: str,
             schema: DatasetSchema, doc: PolicyDocument, parquet: Path, left: tuple[float, float],
             charge: Any) -> ScriptOutcome:
    """``charge(seq, cost)`` charges the ledger in a fenced transaction (raises
    ``BudgetExhausted``)."""
    handle = DatasetHandle(parquet)
    approximate = doc.budget.total_delta > 0
    session = open_session(handle, unit=doc.budget.unit, approximate=approximate,
                           d_in=schema.privacy_unit.max_rows_per_unit, left=left[0],
                           delta_left=left[1])

    answered: list[dict[str, Any]] = []

    def answer(seq: int, raw: dict[str, Any]) -> dict[str, Any]:
        spec = _spec(raw, dataset, schema, doc)
        if doc.mode == "sdc":
            raise Invalid("this dataset's policy uses disclosure control: submit query jobs")
        plan = engine.plan(spec, schema, min_group_size=doc.queries.min_group_size)
        charge(seq, plan.cost)
        table = engine.execute(plan, session, handle, approximate=approximate,
                               budget_unit=doc.budget.unit)
        answered.append({"seq": seq, "query": spec.model_dump(mode="json"),
                         "release": table})  # for the reviewer: every query, cost, intervals
        return table

    outcome = run_script(executor, SandboxRequest(job_id, source, limits_of(doc)), answer,
                         quantum_ms=doc.timing_quantum_ms)
    outcome.answered = answered
    return outcome


def run_mock(executor: Executor, *, job_id: str, source: str, dataset: str,
             schema: DatasetSchema, doc: PolicyDocument, tmpfs_dir: Path) -> ScriptOutcome:
    """The same path on mock data: no budget, outputs and logs straight back."""
    directory = Path(tempfile.mkdtemp(prefix=f"sbx-mock-{os.getpid()}-", dir=tmpfs_dir))
    path = directory / "mock.parquet"
    try:
        pq.write_table(generate_mock(schema, MOCK_ROWS, seed=0), path)
        handle = DatasetHandle(path)

        def answer(seq: int, raw: dict[str, Any]) -> dict[str, Any]:
            spec = _spec(raw, dataset, schema, doc)
            plan = engine.plan(spec, schema, min_group_size=doc.queries.min_group_size)
            session = open_session(handle, unit=plan.unit, approximate=spec.delta is not None,
                                   d_in=schema.privacy_unit.max_rows_per_unit, left=1e6,
                                   delta_left=1e-3)
            table = engine.execute(plan, session, handle, approximate=spec.delta is not None)
            return {**table, "mock": True}

        return run_script(executor, SandboxRequest(job_id, source, limits_of(doc)), answer)
    finally:
        path.unlink(missing_ok=True)
        directory.rmdir()


def content_of(outcome: ScriptOutcome, mode: str) -> dict[str, Any]:
    return {"kind": "script", "mode": mode, "outputs": outcome.outputs, "logs": outcome.logs,
            "queries": outcome.queries, "answered": outcome.answered, "exit": outcome.reason,
            "crash_output": (outcome.exit.stderr[-4000:] if outcome.exit else "")}


__all__ = ["content_of", "ledger", "limits_of", "run_mock", "run_real"]
