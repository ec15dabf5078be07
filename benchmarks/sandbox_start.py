"""Script-job benchmark: sandbox start overhead per backend vs bare ``python3 -c pass``,
and end-to-end latency of a script job with three queries on 1M and 10M rows.

    .venv/bin/python benchmarks/sandbox_start.py [--rows 1000000 10000000] [--repeat 7]

"Start overhead" is the time from launching the sandbox to the script's ``done`` frame for
an empty script (namespaces, mounts, seccomp, interpreter and SDK start), over the time
``python3 -c pass`` takes on the host. Goal for bubblewrap: <= 2x.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.privacy import engine
from sandbox.privacy.mechanisms import DatasetHandle, open_session
from sandbox.privacy.spec import QuerySpec
from sandbox.runner.contract import Executor, Limits, SandboxRequest
from sandbox.runner.session import run_script

THREE_QUERIES = '''
from sandbox.sdk import datasets, count, sum, mean, median, emit
d = datasets["enterprises"]
a = d.group_by("city").agg(count(), sum("annual_revenue")).release(epsilon=0.3)
b = d.filter("industry", "==", "manufacturing").agg(mean("employees")).release(epsilon=0.3)
c = d.agg(median("founded_year")).release(epsilon=0.3)
emit("a", a)
emit("summary", f"{len(a)} cities")
'''


def median_time(fn: Any, repeat: int) -> float:
    fn()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def backends() -> list[Executor]:
    found: list[Executor] = []
    from sandbox.runner.bubblewrap import BubblewrapExecutor
    bwrap = BubblewrapExecutor()
    try:
        bwrap.check_available()
        found.append(bwrap)
    except Exception as exc:
        print(f"bubblewrap unavailable: {exc}")
    try:
        from sandbox.runner.docker_backend import DockerExecutor
        docker = DockerExecutor()
        docker.check_available()
        found.append(docker)
    except Exception as exc:
        print(f"docker unavailable: {exc}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    # the same interpreter the sandbox runs, started the plain way
    bare = median_time(lambda: subprocess.run(["/usr/bin/python3", "-c", "pass"], check=True),
                       args.repeat)
    print(f"bare /usr/bin/python3 -c pass: {bare * 1000:.0f} ms")
    counter = iter(range(10**9))
    for executor in backends():
        def empty(ex: Executor = executor) -> None:
            outcome = run_script(ex, SandboxRequest(f"bench-{next(counter)}", "pass",
                                                    Limits()), lambda s, q: {})
            assert outcome.reason == "ok", outcome.exit
        t = median_time(empty, args.repeat)
        print(f"{executor.name} sandbox start: {t * 1000:.0f} ms, ratio {t / bare:.2f} vs bare")
    for rows in args.rows:
        schema = enterprise_schema(rows)
        work = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="bench-script-"))
        path = work / "data.parquet"
        pl.from_arrow(generate_enterprises(rows, seed=3)).write_parquet(path)  # type: ignore[union-attr]
        handle = DatasetHandle(path)
        for executor in backends():
            def job(ex: Executor = executor, h: DatasetHandle = handle,
                    sch: Any = schema) -> None:
                session = open_session(h, unit="epsilon", approximate=False, d_in=1,
                                       left=10.0)

                def answer(seq: int, raw: dict[str, Any]) -> dict[str, Any]:
                    plan = engine.plan(QuerySpec.model_validate(raw), sch)
                    return engine.execute(plan, session, h, approximate=False)
                outcome = run_script(ex, SandboxRequest(f"bench-{next(counter)}",
                                                        THREE_QUERIES, Limits()), answer)
                assert outcome.reason == "ok" and outcome.queries == 3, outcome.exit
            t = median_time(job, max(3, args.repeat // 2))
            print(f"script job, 3 queries, {rows:,} rows, {executor.name}: {t:.2f} s")
        path.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()
