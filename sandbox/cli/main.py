"""``sandbox``: the command line for operators and every role.

Server-side commands (``init``, ``serve``, ``worker``, ``audit verify``) act on the home
directory; role commands talk to a running server over HTTP with a token
(``--url``/``SANDBOX_URL`` and ``--token``/``SANDBOX_TOKEN``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from sandbox.cli.client import ApiError, SandboxClient
from sandbox.config import Settings

if TYPE_CHECKING:
    from sandbox.runtime import Runtime

app = typer.Typer(help="Private data, usable but invisible: a privacy-preserving data sandbox.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
dataset_app = typer.Typer(help="Data owner: register and inspect datasets.", no_args_is_help=True)
policy_app = typer.Typer(help="Data owner: draft and approve policies.", no_args_is_help=True)
job_app = typer.Typer(help="Analyst: submit and follow jobs.", no_args_is_help=True)
review_app = typer.Typer(help="Reviewer: the review queue.", no_args_is_help=True)
audit_app = typer.Typer(help="Admin: the audit log.", no_args_is_help=True)
keys_app = typer.Typer(help="Admin: master keys.", no_args_is_help=True)
user_app = typer.Typer(help="Admin: users and tokens.", no_args_is_help=True)
release_app = typer.Typer(help="Anyone: fetch and verify signed releases.",
                          no_args_is_help=True)
app.add_typer(release_app, name="release")
app.add_typer(user_app, name="user")
app.add_typer(keys_app, name="keys")
app.add_typer(dataset_app, name="dataset")
app.add_typer(policy_app, name="policy")
app.add_typer(job_app, name="job")
app.add_typer(review_app, name="review")
app.add_typer(audit_app, name="audit")

console = Console(width=None if Console().is_terminal else 110)
Url = Annotated[str, typer.Option(envvar="SANDBOX_URL", help="Server URL")]
Token = Annotated[str, typer.Option(envvar="SANDBOX_TOKEN", help="Bearer token")]


@app.callback()
def _main(home: Annotated[Path | None, typer.Option(help="Home directory (SANDBOX_HOME)")]
          = None, verbose: bool = False) -> None:
    if home is not None:
        os.environ["SANDBOX_HOME"] = str(home.expanduser().resolve())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _settings() -> Settings:
    return Settings()


@contextlib.contextmanager
def _runtime() -> Iterator[Runtime]:
    """The server-side runtime of the home in force, closed afterwards."""
    from sandbox.runtime import Runtime as RuntimeClass
    runtime = RuntimeClass.open(_settings())
    try:
        yield runtime
    finally:
        runtime.close()


def _client(url: str, token: str) -> SandboxClient:
    return SandboxClient(url, token)


def _print(data: Any) -> None:
    console.print_json(json.dumps(data, default=str))


def _run(call: Any) -> None:
    """Run an HTTP call and print its JSON, or the server's error and exit 1."""
    try:
        _print(call())
    except ApiError as exc:
        console.print(f"[red]error {exc.status_code}:[/red] {exc.detail}")
        raise typer.Exit(1) from None


@app.command()
def init() -> None:
    """Create the home: database, master key (0600), admin and the demo roles' tokens."""
    from sandbox.cli.home import initialise
    result = initialise(_settings())
    console.print(f"initialised {result.home}; one token per demo role is in "
                  f"{result.tokens_file} (mode 0600); new ones: 'sandbox user token NAME'")


@app.command()
def serve(workers: Annotated[int, typer.Option(min=0, max=32)] = 1,
          port: Annotated[int | None, typer.Option()] = None) -> None:
    """Run the API and worker processes on this machine until interrupted."""
    from sandbox.cli.serve import serve as run_serve
    if port is not None:
        os.environ["SANDBOX_PORT"] = str(port)
    settings = _settings()
    console.print(f"serving on http://{settings.host}:{settings.port} with {workers} worker(s)")
    run_serve(settings, workers=workers)


@app.command()
def worker() -> None:
    """Run one worker: claims jobs, charges the ledger, answers through the broker."""
    from sandbox.cli.serve import run_worker
    run_worker(_settings())


@app.command()
def demo(rows: Annotated[int, typer.Option(min=1000)] = 1_000_000,
         keep_home: Annotated[Path | None, typer.Option(help="Keep the demo's home here")]
         = None) -> None:
    """The whole story end to end on a bundled dataset, through the real HTTP API."""
    from sandbox.cli.demo import run_demo
    raise typer.Exit(run_demo(rows=rows, keep_home=keep_home, console=console))


@dataset_app.command("register")
def dataset_register(schema: Path, data: Path, url: Url = "http://127.0.0.1:8765",
                     token: Token = "") -> None:
    """Register DATA (CSV or Parquet) described by SCHEMA (YAML), with upload progress."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
    size = data.stat().st_size
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(f"uploading {data.name}", total=size)
        _run(lambda: _client(url, token).register_dataset(
            schema, data, progress=lambda sent: bar.update(task, completed=sent)))


@dataset_app.command("delete")
def dataset_delete(name: str, url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    """Delete NAME: its data keys are destroyed (crypto-shredding)."""
    _run(lambda: _client(url, token).delete_dataset(name))


@dataset_app.command("mock")
def dataset_mock(name: str, out: Path, fmt: Annotated[str, typer.Option("--format")] = "csv",
                 rows: int = 1000, seed: int = 0, url: Url = "http://127.0.0.1:8765",
                 token: Token = "") -> None:
    """Download mock data for NAME (generated from its schema alone) to OUT."""
    try:
        out.write_bytes(_client(url, token).mock_data(name, fmt=fmt, rows=rows, seed=seed))
    except ApiError as exc:
        console.print(f"[red]error {exc.status_code}:[/red] {exc.detail}")
        raise typer.Exit(1) from None
    console.print(f"wrote {out}")


@dataset_app.command("list")
def dataset_list(url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    """The catalog."""
    _run(lambda: _client(url, token).datasets())


@dataset_app.command("show")
def dataset_show(name: str, url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    """One dataset's metadata and schema."""
    _run(lambda: _client(url, token).dataset(name))


@policy_app.command("submit")
def policy_submit(dataset: str, policy: Path, url: Url = "http://127.0.0.1:8765",
                  token: Token = "") -> None:
    """Submit POLICY (YAML) as a draft for DATASET."""
    _run(lambda: _client(url, token).draft_policy(dataset, policy.read_text()))


@policy_app.command("approve")
def policy_approve(dataset: str, version: int, url: Url = "http://127.0.0.1:8765",
                   token: Token = "") -> None:
    """Approve draft VERSION of DATASET's policy."""
    _run(lambda: _client(url, token).approve_policy(dataset, version))


@job_app.command("submit")
def job_submit(query: Path, url: Url = "http://127.0.0.1:8765", token: Token = "",
               idempotency_key: Annotated[str | None, typer.Option(
                   help="Reuse to make a retry return the same job")] = None) -> None:
    """Submit a query job from a JSON query spec file."""
    _run(lambda: _client(url, token).submit_query(json.loads(query.read_text()),
                                                  idempotency_key=idempotency_key))


@job_app.command("sql")
def job_sql(text: str, epsilon: float | None = None, rho: float | None = None,
            url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    """Submit a DP-SQL query job, e.g. "SELECT city, COUNT(*) FROM enterprises GROUP BY city"."""
    _run(lambda: _client(url, token).submit_sql(text, epsilon=epsilon, rho=rho))


@job_app.command("script")
def job_script(script: Path, dataset: Annotated[str, typer.Option()],
               mock: Annotated[bool, typer.Option(help="Run on mock data: no budget, "
                                                  "outputs straight back")] = False,
               url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    """Submit a Python script job for DATASET (screened before it is queued)."""
    _run(lambda: _client(url, token).submit_script(dataset, script.read_text(),
                                                   mode="mock" if mock else "real"))


@job_app.command("status")
def job_status(job_id: str, url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    _run(lambda: _client(url, token).job(job_id))


@job_app.command("result")
def job_result(job_id: str, url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    """The released table of a job."""
    _run(lambda: _client(url, token).result(job_id))


@app.command("run")
def run_local(script: Path, dataset: Annotated[str, typer.Option()],
              mock: Annotated[bool, typer.Option(help="required: local runs use mock "
                                                 "data only")] = False,
              url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    """Run SCRIPT here, in the same sandbox, on mock data made from DATASET's schema
    (fetched from the catalog): full logs, no budget, no real rows."""
    from sandbox.cli.local_run import run_mock_locally
    if not mock:
        console.print("[red]error:[/red] local runs need --mock; real runs are jobs "
                      "('sandbox job script')")
        raise typer.Exit(2)
    raise typer.Exit(run_mock_locally(script, dataset, _client(url, token), console))


@app.command()
def budget(dataset: str, url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    """Epsilon spent and left on DATASET."""
    _run(lambda: _client(url, token).budget(dataset))


@review_app.command("list")
def review_list(url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    _run(lambda: _client(url, token).review_queue())


@review_app.command("approve")
def review_approve(job_id: str, url: Url = "http://127.0.0.1:8765", token: Token = "") -> None:
    _run(lambda: _client(url, token).approve(job_id))


@review_app.command("reject")
def review_reject(job_id: str, reason: str, url: Url = "http://127.0.0.1:8765",
                  token: Token = "") -> None:
    _run(lambda: _client(url, token).reject(job_id, reason))


@keys_app.command("rotate")
def keys_rotate(retire: Annotated[bool, typer.Option(help="Destroy old master keys after")]
                = False) -> None:
    """Rewrap every data key under a new master key (no data is re-encrypted)."""
    from sandbox.datasets.lifecycle import rotate_master_key
    with _runtime() as runtime:
        rotation = rotate_master_key(runtime.db, runtime.keys, retire_old=retire)
    console.print(f"new master key {rotation.new_key_id}; rewrapped {rotation.rewrapped} data "
                  f"key(s); retired {list(rotation.retired) or 'none'}")


@keys_app.command("list")
def keys_list() -> None:
    """The master keys held and how many data keys each wraps."""
    from sqlalchemy import func, select

    from sandbox.db.models import DatasetVersion
    with _runtime() as runtime:
        with runtime.db.transaction() as session:
            counts = dict(session.execute(
                select(DatasetVersion.key_id, func.count()).where(
                    DatasetVersion.wrapped_key.is_not(None)).group_by(DatasetVersion.key_id)
            ).tuples().all())
        current = runtime.keys.current().key_id
        for key_id in runtime.keys.key_ids():
            mark = " (current)" if key_id == current else ""
            console.print(f"{key_id}{mark}: wraps {counts.get(key_id, 0)} data key(s)")


@audit_app.command("head")
def audit_head() -> None:
    """Print the chain's head (entry count and hash) for anchoring somewhere else."""
    from sandbox.audit import verify
    with _runtime() as runtime, runtime.db.transaction() as session:
        result = verify(session)
    typer.echo(json.dumps({"events": result.events, "head": result.head, "intact": result.ok}))


@release_app.command("get")
def release_get(job_id: str, out: Path, url: Url = "http://127.0.0.1:8765",
                token: Token = "") -> None:
    """Save a released job's signed artifact to OUT."""
    try:
        artifact = _client(url, token).release(job_id)
    except ApiError as exc:
        console.print(f"[red]error {exc.status_code}:[/red] {exc.detail}")
        raise typer.Exit(1) from None
    out.write_text(json.dumps(artifact, indent=1, ensure_ascii=False))
    console.print(f"wrote {out}")


@release_app.command("verify")
def release_verify(file: Path,
                   public_key: Annotated[Path | None, typer.Option(
                       help="PEM file of the release public key")] = None,
                   url: Annotated[str | None, typer.Option(
                       help="or fetch the key from this server")] = None) -> None:
    """Check a saved release: signature, signing key and content hash."""
    from sandbox.review.signing import ReleaseInvalid, verify
    if public_key is not None:
        pem = public_key.read_text()
    elif url is not None:
        import httpx
        pem = httpx.get(f"{url}/v1/releases/public-key", timeout=30).json()["pem"]
    else:
        console.print("[red]error:[/red] give --public-key or --url")
        raise typer.Exit(2)
    try:
        payload = verify(json.loads(file.read_text()), pem)
    except (ReleaseInvalid, ValueError) as exc:
        console.print(f"[red]INVALID:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"valid: job {payload['job_id']}, sha256 {payload['sha256']}, released "
                  f"{payload['released_at']}")


@audit_app.command("verify")
def audit_verify(expect_head: Annotated[str | None, typer.Option(
        help="a head exported earlier: detects deletion of the newest entries")] = None,
                 expect_events: Annotated[int | None, typer.Option()] = None) -> None:
    """Check the audit log's hash chain; names the first bad entry."""
    from sandbox.audit import verify
    if (expect_head is None) != (expect_events is None):
        console.print("[red]error:[/red] give --expect-head and --expect-events together "
                      "(both printed by 'sandbox audit head')")
        raise typer.Exit(2)
    with _runtime() as runtime, runtime.db.transaction() as session:
        result = verify(session)
        anchored = verify(session, upto=expect_events) if expect_events else None
    if result.ok and expect_events is not None and result.events < expect_events:
        console.print(f"[red]audit log truncated:[/red] {result.events} events, the exported "
                      f"head had {expect_events}; entries from {result.events + 1} are gone")
        raise typer.Exit(1)
    if result.ok and anchored is not None and anchored.head != expect_head:
        console.print(f"[red]audit log rewritten:[/red] entry {expect_events} no longer has "
                      "the exported hash")
        raise typer.Exit(1)
    if result.ok:
        console.print(f"audit log intact: {result.events} events, head {result.head}")
        return
    console.print(f"[red]audit log broken at entry {result.first_bad_seq}:[/red] "
                  f"{result.reason}")
    raise typer.Exit(1)


@user_app.command("add")
def user_add(name: str, org: Annotated[str, typer.Option(help="Organisation")],
             role: Annotated[str, typer.Option(help="admin, owner, analyst or reviewer")],
             create_org: bool = False) -> None:
    """Admin, on the server: create a user (and optionally its organisation)."""
    from sandbox.identity.service import Role, create_organisation, create_user
    with _runtime() as runtime, runtime.db.transaction() as session:
        if create_org:
            create_organisation(session, org, actor_id=None)
        create_user(session, name, org_name=org, role=Role(role), actor_id=None)
    console.print(f"user {name} ({role}) in {org} created; issue a token with "
                  f"'sandbox user token {name}'")


@user_app.command("token")
def user_token(name: str, days: Annotated[int, typer.Option(min=1, max=3650)] = 90) -> None:
    """Admin, on the server: issue a new API token for NAME (printed once)."""
    from datetime import timedelta

    from sqlalchemy import select

    from sandbox.db.models import User
    from sandbox.errors import NotFound
    from sandbox.identity.service import issue_token
    with _runtime() as runtime, runtime.db.transaction() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"user {name!r} not found")
        token = issue_token(session, user, actor_id=None, ttl=timedelta(days=days))
    typer.echo(token)


@user_app.command("revoke")
def user_revoke(name: str, disable: Annotated[bool, typer.Option(
        help="also disable the user (every token then fails at once)")] = False) -> None:
    """Admin, on the server: revoke every token of NAME (401 from the next request)."""
    from sqlalchemy import select

    from sandbox.audit import record
    from sandbox.db.models import ApiToken, User, utcnow
    from sandbox.errors import NotFound
    with _runtime() as runtime, runtime.db.transaction() as session:
        user = session.scalar(select(User).where(User.name == name))
        if user is None:
            raise NotFound(f"user {name!r} not found")
        tokens = list(session.scalars(select(ApiToken).where(
            ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))))
        for token in tokens:
            token.revoked_at = utcnow()
        count = len(tokens)
        if disable:
            user.disabled_at = utcnow()
        record(session, actor_id=None, action="user.tokens_revoked", object_type="user",
               object_id=user.id, detail={"tokens": count, "disabled": disable})
    console.print(f"revoked {count} token(s) of {name}" + ("; user disabled" if disable else ""))


def main() -> None:
    """Entry point: domain errors become one clean line and exit code 1."""
    from sandbox.datasets.keys import KeyUnavailable
    from sandbox.errors import SandboxError
    try:
        app()
    except (SandboxError, KeyUnavailable, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
