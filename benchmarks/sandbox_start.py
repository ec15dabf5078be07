"""Script-job benchmark: sandbox start overhead per backend vs bare ``python3 -c pass``,
and end-to-end latency of a script job with three queries on 1M and 10M rows.

    .venv/bin/python benchmarks/sandbox_start.py [--rows 1000000 10000000] [--repeat 7]

"Start overhead" is the whole ``run_script`` of an empty script: staging the script,
starting the sandbox (namespaces, mounts, seccomp, uid drop, rlimits, interpreter, SDK
bootstrap), its ``done`` frame, its exit and the cleanup, over the time
``python3 -c pass`` takes on the host. Bare and sandboxed runs alternate, so load on the
machine hits both sides alike. Goal for bubblewrap: <= 2x.

bubblewrap is measured twice: as configured by default (``SANDBOX_RUNNER_PRESTART=true``:
the launcher, a shell already moved into a fresh cgroup and dropped to a fresh uid, was
started while the previous job ran) and cold (``false``: the launcher is started when the
job arrives, paying the cgroup move's RCU grace period, about 6 ms on cgroup v1). The
floor line is bwrap with the same namespaces running ``python3 -I -S -c pass``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl

from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.privacy import engine
from sandbox.privacy.mechanisms import DatasetHandle, open_session
from sandbox.privacy.spec import QuerySpec
from sandbox.runner.bubblewrap import BubblewrapExecutor
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


FLOOR = [*(["setpriv", "--reuid=250000", "--regid=250000", "--clear-groups", "--"]
           if os.geteuid() == 0 else []),
         "bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
         "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
         "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--",
         "/usr/bin/python3", "-I", "-S", "-c", "pass"]


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


def _bare() -> None:
    subprocess.run(["/usr/bin/python3", "-c", "pass"], check=True)


def _empty_job(executor: Executor, counter: Iterator[int]) -> Callable[[], None]:
    def run() -> None:
        outcome = run_script(executor, SandboxRequest(f"bench-{next(counter)}", "pass",
                                                      Limits()), lambda s, q: {})
        assert outcome.reason == "ok", outcome.exit
    return run


def start_ratios(repeat: int) -> None:
    """Per backend, rounds that alternate bare python3 with that backend's variants (the
    Docker daemon's work after each container would otherwise land on the others)."""
    counter = iter(range(10**9))
    for executor in backends():
        runs: dict[str, Callable[[], None]] = {"bare": _bare}
        if isinstance(executor, BubblewrapExecutor):
            runs["floor: bwrap --unshare-all + python3 -I -S -c pass"] = \
                lambda: subprocess.run(FLOOR, check=True)
            runs["bubblewrap (default: launcher started ahead)"] = \
                _empty_job(executor, counter)
            runs["bubblewrap (cold launcher)"] = _empty_job(
                BubblewrapExecutor(executor.root, prestart=False), counter)
        else:
            runs[executor.name] = _empty_job(executor, counter)
        times: dict[str, list[float]] = {label: [] for label in runs}
        for fn in runs.values():
            fn()  # warm the page cache and the runtime
        for _ in range(repeat):
            for label, fn in runs.items():
                started = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - started)
        bare = statistics.median(times.pop("bare"))
        print(f"bare /usr/bin/python3 -c pass (alternating with {executor.name}): "
              f"{bare * 1000:.1f} ms")
        for label, values in times.items():
            t = statistics.median(values)
            print(f"  {label}: {t * 1000:.1f} ms, ratio {t / bare:.2f} vs bare")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeat", type=int, default=21)
    args = parser.parse_args()
    start_ratios(args.repeat)
    counter = iter(range(10**9))
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
