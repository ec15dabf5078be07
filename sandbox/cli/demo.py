"""``sandbox demo``: the whole story, five steps, through the real HTTP API.

It creates a fresh home, generates the bundled Jiangsu enterprise registry (the owner's
own source file, in a temporary folder), starts ``sandbox serve`` on a free loopback
port with a worker beside it, plays each role with its own token, prints what happened,
and stops the server.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from sandbox.cli.client import ApiError, SandboxClient
from sandbox.cli.home import initialise
from sandbox.config import Settings
from sandbox.datasets.generator import write_demo_files

POLICY_FILE = Path(__file__).resolve().parent.parent / "data" / "enterprises.policy.yaml"

QUERY: dict[str, Any] = {
    "dataset": "enterprises",
    "filters": [{"column": "industry", "op": "==", "value": "manufacturing"}],
    "group_by": ["city"],
    "aggregates": [{"kind": "count"}, {"kind": "sum", "column": "annual_revenue"},
                   {"kind": "mean", "column": "employees"}],
    "epsilon": 0.5,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_server(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SANDBOX_HOME": str(home), "SANDBOX_PORT": str(port),
           "SANDBOX_HOST": "127.0.0.1"}
    return subprocess.Popen([sys.executable, "-m", "sandbox.cli.main", "serve", "--workers", "1"],
                            env=env, stdout=subprocess.DEVNULL)


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy in time")


def _expect_refusal(console: Console, what: str, call: Any) -> None:
    try:
        call()
    except ApiError as exc:
        console.print(f"   refused as expected ({what}): [yellow]HTTP {exc.status_code}[/yellow] "
                      f"{exc.detail}")
        return
    raise RuntimeError(f"{what} was not refused")


def _release_table(result: dict[str, Any]) -> Table:
    table = Table(title="Released: manufacturing enterprises by city (DP, 95% intervals)")
    for col in result["columns"]:
        table.add_column(col["name"], justify="left" if col["kind"] == "key" else "right")
    for row in result["rows"]:
        cells = []
        for col in result["columns"]:
            cell = row[col["name"]]
            if col["kind"] == "key":
                cells.append(str(cell))
            elif cell["value"] is None:
                cells.append("-")
            elif cell["low"] is None:
                cells.append(f"{cell['value']:,.1f}")
            elif col["kind"] == "mean":
                cells.append(f"{cell['value']:,.1f} ({cell['low']:,.1f} to {cell['high']:,.1f})")
            else:
                cells.append(f"{cell['value']:,.0f} ± {(cell['high'] - cell['low']) / 2:,.0f}")
        table.add_row(*cells)
    return table


SCRIPT = """
from sandbox.sdk import datasets, count, mean, median, emit
d = datasets["enterprises"]
by_industry = d.group_by("industry").agg(count(), mean("employees")).release(epsilon=0.3)
typical = d.filter("city", "==", "Suzhou").agg(median("founded_year")).release(epsilon=0.2)
year = typical.values()[0]["median_founded_year"]
print("industries released:", len(by_industry))
emit("enterprises_by_industry", by_industry)
emit("note", f"a typical Suzhou enterprise was founded around {year:.0f}")
"""


def _signed_release(console: Console, analyst: SandboxClient, job_id: str, url: str) -> None:
    from sandbox.review.signing import verify
    console.rule("[bold]6. anyone: verify the signed release")
    artifact = analyst.release(job_id)
    pem = httpx.get(f"{url}/v1/releases/public-key", timeout=30).json()["pem"]
    payload = verify(artifact, pem)
    console.print(f"release of job {job_id[:8]}... signed with Ed25519 key "
                  f"{artifact['key_id']}: valid, bound to sha256 {payload['sha256'][:16]}...")
    forged = json.loads(json.dumps(artifact))
    forged["payload"]["content"]["rows"][0]["count"]["value"] += 1
    try:
        verify(forged, pem)
    except Exception as exc:
        console.print(f"   a copy with one number changed: [yellow]{exc}[/yellow]")


def _script_job(console: Console, analyst: SandboxClient, reviewer: SandboxClient) -> None:
    console.rule("[bold]7. analyst: a Python script in the sandbox (mock run, then real)")
    if shutil.which("bwrap") is None:
        console.print("skipped: bubblewrap is not installed (apt-get install bubblewrap); "
                      "script jobs are refused rather than run without isolation")
        return
    _expect_refusal(console, "a script that imports os",
                    lambda: analyst.submit_script("enterprises", "import os\nprint(os.environ)"))
    mock = analyst.submit_script("enterprises", SCRIPT, mode="mock")
    mock = analyst.wait(mock["id"], timeout=120)
    if mock["status"] != "released":
        raise RuntimeError(f"mock run ended {mock['status']}: {mock['error']}")
    logs = "".join(line["text"] for line in analyst.result(mock["id"])["logs"])
    console.print(f"mock run (mock data, no budget), logs straight back: {logs.strip()}")
    real = analyst.submit_script("enterprises", SCRIPT)
    real = analyst.wait(real["id"], timeout=120)
    if real["status"] != "pending_review":
        raise RuntimeError(f"script job ended {real['status']}: {real['error']}")
    review = reviewer.review(real["id"])["output"]
    console.print(f"real run: {review['queries']} queries answered by the broker, outputs "
                  f"{[o['name'] for o in review['outputs']]}; checks: "
                  f"{sorted({c['check'] for c in review['checks']})}")
    reviewer.approve(real["id"])
    released = analyst.result(real["id"])
    note = next(o["payload"] for o in released["outputs"] if o["name"] == "note")
    console.print(f"released after review: {note}")


def _audit(console: Console, home: Path) -> None:
    from sandbox.audit import verify as verify_audit
    from sandbox.runtime import Runtime
    console.rule("[bold]8. admin: the audit log")
    runtime = Runtime.open(Settings(home=home))
    try:
        with runtime.db.transaction() as session:
            result = verify_audit(session)
    finally:
        runtime.close()
    console.print(f"hash chain intact: {result.ok}, {result.events} events, head "
                  f"{result.head[:16]}...")


def run_demo(*, rows: int, keep_home: Path | None, console: Console) -> int:
    """Play the story; return the process exit code."""
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="sandbox-demo-"))
    home = keep_home.expanduser().resolve() if keep_home else work / "home"
    if keep_home and home.exists():
        shutil.rmtree(home)
    proc: subprocess.Popen[bytes] | None = None
    try:
        console.rule("[bold]0. operator: sandbox init")
        result = initialise(Settings(home=home))
        tokens = result.tokens
        console.print(f"home {home}: SQLite database, master key (0600), admin and one user "
                      "per role")
        owner_files = work / "owner-files"
        owner_files.mkdir()
        data_path, schema_path = write_demo_files(owner_files, rows, 2026)
        console.print(f"the data owner's own source file: {rows:,} enterprises "
                      f"({data_path.stat().st_size / 1e6:.1f} MB Parquet)")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = _start_server(home, port)
        _wait_healthy(url, proc)
        console.print(f"server up at {url} (API + 1 worker)")
        owner = SandboxClient(url, tokens["owner"])
        analyst = SandboxClient(url, tokens["analyst"])
        reviewer = SandboxClient(url, tokens["reviewer"])

        console.rule("[bold]1-2. data owner (jiangsu-data-bureau): register the dataset")
        t = time.monotonic()
        detail = owner.register_dataset(schema_path, data_path)
        console.print(f"registered '{detail['name']}' version {detail['versions'][-1]['version']}"
                      f" in {time.monotonic() - t:.1f}s: validated against the schema, "
                      "encrypted with AES-256-GCM under a fresh data key wrapped by the "
                      "master key")
        for col in detail["schema"]["columns"]:
            console.print(f"   {col['name']:<16} {col['type']:<9} {col['classification']}  "
                          f"{col.get('description', '')}")
        _expect_refusal(console, "query before any policy is approved",
                        lambda: analyst.submit_query(QUERY))

        console.rule("[bold]3. data owner: submit and approve the policy")
        draft = owner.draft_policy("enterprises", POLICY_FILE.read_text())
        approved = owner.approve_policy("enterprises", draft["version"])
        budget = approved["policy"]["budget"]
        console.print(f"policy v{approved['version']} approved: grants "
                      f"{[g['organisation'] for g in approved['policy']['grants']]}, total "
                      f"{budget['unit']} {budget['total']}, per job {budget['per_job']}, "
                      f"review required: {approved['policy']['review_required']}")

        console.rule("[bold]4. analyst (suzhou-analytics): browse, estimate, submit")
        catalog = analyst.datasets()
        console.print(f"catalog: {[d['name'] for d in catalog]} (metadata only; exact row "
                      f"count hidden: {catalog[0]['versions'][-1]['row_count']})")
        _expect_refusal(console, "epsilon over the per-job cap",
                        lambda: analyst.submit_query({**QUERY, "epsilon": 2.0}))
        _expect_refusal(console, "a column the schema lacks",
                        lambda: analyst.submit_query({**QUERY, "group_by": ["district"]}))
        _expect_refusal(console, "an L4 (core) column",
                        lambda: analyst.submit_query({**QUERY, "group_by": ["enterprise_id"]}))
        estimate = analyst.estimate(QUERY)
        console.print(f"dry run: {estimate['cost']['unit']} {estimate['cost']['amount']:.3g}, "
                      f"95% half-widths "
                      f"{ {k: round(v, 1) for k, v in estimate['half_width'].items() if v} }")
        job = analyst.submit_query(QUERY)
        console.print(f"submitted job {job['id']}: count, sum(annual_revenue), mean(employees) "
                      "of manufacturing enterprises by city, epsilon 0.5")
        job = analyst.wait(job["id"])
        console.print(f"worker: charged the ledger first, decrypted in RAM, answered through "
                      f"OpenDP; job is now '{job['status']}'")
        if job["status"] != "pending_review":
            raise RuntimeError(f"job ended {job['status']}: {job['error']}")
        _expect_refusal(console, "download before review", lambda: analyst.result(job["id"]))

        console.rule("[bold]5. reviewer (provincial-review-office): approve; analyst fetches")
        queue = reviewer.review_queue()
        console.print(f"review queue: {[j['id'] for j in queue]}")
        under_review = reviewer.review(job["id"])
        console.print(f"reviewing: {len(under_review['output']['rows'])} rows, epsilon "
                      f"{under_review['output']['epsilon']:.3g}, sha256 "
                      f"{under_review['sha256'][:16]}...")
        release = reviewer.approve(job["id"])
        console.print(f"approved; release {release['release']['id']} bound to sha256 "
                      f"{release['release']['sha256'][:16]}...")
        released = analyst.result(job["id"])
        console.print(_release_table(released))
        spent = released["budget"]
        console.print(f"epsilon spent by this job: {released['epsilon']:.3g}; dataset budget "
                      f"spent {spent['spent']:.3g} of {spent['total']:.3g}, left "
                      f"{spent['left']:.3g}; your organisation has "
                      f"{spent['organisation']['left']:.3g} left of "
                      f"{spent['organisation']['cap']:.3g}")
        _signed_release(console, analyst, job["id"], url)
        _script_job(console, analyst, reviewer)
        _audit(console, home)
        console.rule(f"[bold green]demo finished in {time.monotonic() - started:.1f}s")
        return 0
    except (ApiError, RuntimeError, TimeoutError) as exc:
        console.print(f"[red]demo failed:[/red] {exc}")
        return 1
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if not keep_home:
            shutil.rmtree(work, ignore_errors=True)
