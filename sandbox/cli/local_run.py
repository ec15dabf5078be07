"""``sandbox run SCRIPT --mock --dataset NAME``: an analyst's local debugging loop.

The schema and the policy in force come from the catalog (public metadata); mock data is
generated from the schema alone; the script runs in the same sandbox backend a worker
uses, and its queries are answered from the mock data with no budget. Logs and outputs
are printed in full.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console

from sandbox.cli.client import ApiError, SandboxClient
from sandbox.config import Settings
from sandbox.datasets.schema import DatasetSchema
from sandbox.jobs import scripts
from sandbox.jobs.screen import screen
from sandbox.policies.model import PolicyDocument
from sandbox.runner.factory import make_executor


def run_mock_locally(script: Path, dataset: str, client: SandboxClient,
                     console: Console) -> int:
    source = script.read_text()
    screen(source)
    try:
        detail = client.dataset(dataset)
        policies = client.policies(dataset)
    except ApiError as exc:
        console.print(f"[red]error {exc.status_code}:[/red] {exc.detail}")
        return 1
    if not policies:
        console.print(f"[red]error:[/red] dataset {dataset!r} has no approved policy")
        return 1
    schema = DatasetSchema.from_dict(detail["schema"])
    doc = PolicyDocument.model_validate(policies[-1]["policy"])
    settings = Settings()
    executor = make_executor(settings)
    executor.check_available()
    outcome = scripts.run_mock(executor, job_id=f"local-{os.getpid()}-{time.time_ns()}",
                               source=source, dataset=dataset, schema=schema, doc=doc,
                               tmpfs_dir=settings.tmpfs_dir)
    for line in outcome.logs:
        console.print(line["text"], end="", markup=False, highlight=False,
                      style="red" if line["stream"] == "stderr" else None)
    for output in outcome.outputs:
        console.rule(f"output {output['name']} ({output['kind']})")
        payload = output["payload"]
        console.print(payload if isinstance(payload, str) else json.dumps(payload)[:4000],
                      markup=False)
    console.rule(f"{outcome.queries} queries on mock data; ended: {outcome.reason}")
    return 0 if outcome.reason == "ok" else 1
