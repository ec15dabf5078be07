"""The bubblewrap launcher: a shell in a fresh cgroup under a fresh uid that waits for
its job, and the ``Prestart`` that keeps one ready. Real bubblewrap, real cgroups."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import missing_part

from sandbox.runner import limits as cg
from sandbox.runner import staging
from sandbox.runner.bubblewrap import BubblewrapExecutor
from sandbox.runner.contract import Limits, SandboxRequest
from sandbox.runner.launcher import Launcher, Prestart
from sandbox.runner.runtime import ensure_runtime
from sandbox.runner.session import run_script
from sandbox.sdk import protocol

ROOT = Path("/var/lib/sandbox-runtime")
LIMITS = Limits(wall_seconds=20, cpu_seconds=7, memory_bytes=300 * 1024 * 1024,
                processes=24, scratch_bytes=4 * 1024 * 1024)
REPORT = '''
import os, resource
from sandbox.sdk import emit
emit("who", repr({"uid": os.getuid(), "cpu": resource.getrlimit(resource.RLIMIT_CPU),
                  "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
                  "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)}))
'''


@pytest.fixture(scope="module")
def site() -> Path:
    if shutil.which("bwrap") is None:
        missing_part("bubblewrap (apt-get install bubblewrap)")
    if os.geteuid() != 0:
        pytest.skip("the launcher's uid drop and cgroups need a root worker")
    return ensure_runtime(ROOT)


@pytest.fixture
def bwrap_executor(site: Path) -> Iterator[BubblewrapExecutor]:
    executor = BubblewrapExecutor(ROOT)
    yield executor
    executor.close()


def _wait_until(check: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _report(executor: BubblewrapExecutor, job: str) -> dict[str, object]:
    outcome = run_script(executor, SandboxRequest(job, REPORT, LIMITS), lambda s, q: {})
    assert outcome.reason == "ok", outcome.exit
    value: dict[str, object] = eval(outcome.outputs[0]["payload"])  # our own repr
    return value


def test_a_launcher_waits_in_its_own_cgroup_under_its_own_uid(site: Path) -> None:
    launcher = Launcher.start(shutil.which("bwrap") or "bwrap", site)
    try:
        pid = launcher.proc.pid
        assert 200_000 <= launcher.uid < 300_000
        # the shell moves itself into the cgroup, then setpriv drops it to the uid
        _wait_until(lambda: _uid(pid) == launcher.uid)
        for path in launcher.cgroup.paths:
            assert str(pid) in (path / "cgroup.procs").read_text().split()
        assert launcher.alive()
    finally:
        launcher.discard()
    assert not launcher.alive()
    assert all(not path.exists() for path in launcher.cgroup.paths)


def test_hand_off_applies_the_jobs_limits(site: Path, tmp_path: Path) -> None:
    jobdir = ROOT / "jobs" / f"launcher-test-{os.getpid()}"
    jobdir.mkdir(parents=True, exist_ok=True)
    script = jobdir / "script.py"
    script.write_text("from sandbox.sdk.channel import BrokerError, query\n"
                      "try:\n    query({})\nexcept BrokerError:\n    pass\n")
    script.chmod(0o644)
    jobdir.chmod(0o755)
    launcher = Launcher.start(shutil.which("bwrap") or "bwrap", site)
    try:
        launcher.hand_off(LIMITS, script)
        if launcher.cgroup.mode == "cgroup1":
            memory = launcher.cgroup.paths[0] / "memory.limit_in_bytes"
            pids = launcher.cgroup.paths[1] / "pids.max"
        elif launcher.cgroup.mode == "cgroup2":
            memory = launcher.cgroup.paths[0] / "memory.max"
            pids = launcher.cgroup.paths[0] / "pids.max"
        else:
            pytest.skip("cgroups are not writable here (rlimits fallback)")
        assert int(memory.read_text()) == LIMITS.memory_bytes
        assert int(pids.read_text()) == LIMITS.processes
        assert launcher.proc.stdin is not None and launcher.proc.stdout is not None
        assert protocol.read(launcher.proc.stdout)["type"] == "query"  # it runs, and waits
        # the sandbox's processes (bwrap, its init, python) are all inside the cgroup
        procs = (launcher.cgroup.paths[0] / "cgroup.procs").read_text().split()
        assert len(procs) >= 3 and str(launcher.proc.pid) in procs
        protocol.write(launcher.proc.stdin, {"type": "error", "id": 1, "detail": "no"})
        assert protocol.read(launcher.proc.stdout) == {"v": 1, "type": "done", "status": 0}
        assert launcher.proc.wait(timeout=10) == 0
    finally:
        launcher.discard()
        shutil.rmtree(jobdir, ignore_errors=True)


def test_a_launcher_whose_worker_goes_away_exits(site: Path) -> None:
    """The worker's end of stdin closing (the worker died) ends a waiting launcher; it
    never runs anything."""
    launcher = Launcher.start(shutil.which("bwrap") or "bwrap", site)
    try:
        assert launcher.proc.stdin is not None
        launcher.proc.stdin.close()
        assert launcher.proc.wait(timeout=10) == 125
    finally:
        launcher.discard()


def test_each_job_gets_a_fresh_uid_and_its_rlimits(bwrap_executor: BubblewrapExecutor) -> None:
    first = _report(bwrap_executor, f"launch-a-{os.getpid()}")
    second = _report(bwrap_executor, f"launch-b-{os.getpid()}")
    for seen in (first, second):
        assert 200_000 <= int(seen["uid"]) < 300_000  # type: ignore[call-overload]
        assert seen["cpu"] == (LIMITS.cpu_seconds, LIMITS.cpu_seconds)
        assert seen["fsize"] == (LIMITS.scratch_bytes,) * 2
        assert seen["nofile"] == (256, 256)
    assert first["uid"] != second["uid"]


def test_cold_and_warm_starts_give_the_same_sandbox(site: Path) -> None:
    cold = BubblewrapExecutor(ROOT, prestart=False)
    warm = BubblewrapExecutor(ROOT, prestart=True)
    try:
        seen = [_report(ex, f"launch-{name}-{i}-{os.getpid()}")
                for i in range(2) for name, ex in (("cold", cold), ("warm", warm))]
        _wait_until(lambda: warm.prestart._ready is not None)  # refilled in the background
        assert cold.prestart._ready is None  # never started ahead
        shapes = {json.dumps({k: v for k, v in s.items() if k != "uid"}) for s in seen}
        assert len(shapes) == 1
    finally:
        cold.close()
        warm.close()


def test_a_dead_or_stale_launcher_is_replaced(site: Path, tmp_path: Path) -> None:
    prestart = Prestart(shutil.which("bwrap") or "bwrap")
    try:
        first = prestart.take(site)
        first.discard()
        prestart.refill(site)
        _wait_until(lambda: prestart._ready is not None)
        ready = prestart._ready
        assert ready is not None
        ready.proc.kill()  # it died while waiting
        ready.proc.wait()
        second = prestart.take(site)
        assert second is not ready and second.alive()
        second.discard()
        prestart.refill(site)
        _wait_until(lambda: prestart._ready is not None)
        waiting = prestart._ready
        assert waiting is not None
        other_runtime = tmp_path / "site-packages"
        third = prestart.take(other_runtime)  # a new runtime: the waiting one is stale
        assert third is not waiting and third.site == other_runtime
        assert not waiting.alive()
        third.discard()
    finally:
        prestart.close()


def test_close_discards_the_waiting_launcher(bwrap_executor: BubblewrapExecutor) -> None:
    _report(bwrap_executor, f"launch-close-{os.getpid()}")
    _wait_until(lambda: bwrap_executor.prestart._ready is not None)
    waiting = bwrap_executor.prestart._ready
    assert waiting is not None
    bwrap_executor.close()
    assert not waiting.alive()
    assert all(not path.exists() for path in waiting.cgroup.paths)
    bwrap_executor.close()  # idempotent
    _report(bwrap_executor, f"launch-after-close-{os.getpid()}")  # still works, cold
    assert bwrap_executor.prestart._ready is None


def _dead_pid() -> int:
    proc = subprocess.Popen(["/usr/bin/true"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_what_dead_workers_left(site: Path) -> None:
    """cgroups and staged scripts are tagged with their worker (host, pid, start time);
    a sweep removes a dead worker's and keeps a live one's."""
    dead = f"{_dead_pid()}-1"
    dead_cgroup = cg.create(f"{dead}-feed", LIMITS)
    if not dead_cgroup.paths:
        pytest.skip("cgroups are not writable here (rlimits fallback)")
    live_cgroup = cg.create(f"{staging.short_tag()}-beef", LIMITS)
    live_dir = staging.stage_script(ROOT, f"sweep-live-{os.getpid()}", "pass")
    dead_dir = ROOT / "jobs" / f"sweep-dead-{os.getpid()}.{dead}"
    dead_dir.mkdir(parents=True)
    (dead_dir / ".owner").write_text(f"{socket.gethostname()}:{dead.replace('-', ':')}")
    (dead_dir / "script.py").write_text("secret analysis")
    other_host = ROOT / "jobs" / f"sweep-other-{os.getpid()}.1-1"
    other_host.mkdir()
    (other_host / ".owner").write_text(f"elsewhere:{dead.replace('-', ':')}")
    untagged_old = ROOT / "jobs" / f"sweep-legacy-{os.getpid()}"
    untagged_old.mkdir()
    os.utime(untagged_old, (time.time() - 7200, time.time() - 7200))
    try:
        swept = BubblewrapExecutor(ROOT, prestart=False).sweep()
        assert swept >= 2 + len(dead_cgroup.paths)
        assert all(not path.exists() for path in dead_cgroup.paths)
        assert not dead_dir.exists() and not untagged_old.exists()
        assert all(path.exists() for path in live_cgroup.paths)
        assert live_dir.exists() and other_host.exists()  # live, or not ours to judge
    finally:
        live_cgroup.remove()
        for path in (live_dir, dead_dir, other_host, untagged_old):
            shutil.rmtree(path, ignore_errors=True)


def test_staged_directories_are_per_worker_and_tagged(site: Path) -> None:
    workdir = staging.stage_script(ROOT, f"stage-{os.getpid()}", "print(1)")
    try:
        assert workdir.name == f"stage-{os.getpid()}.{staging.short_tag()}"
        assert (workdir / ".owner").read_text() == staging.my_tag()
        assert not staging.is_dead(staging.my_tag())
        assert oct((workdir / "script.py").stat().st_mode & 0o777) == "0o644"
        with pytest.raises(ValueError, match="plain name"):
            staging.stage_script(ROOT, "../escape", "pass")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_rlimits_fallback_sets_address_space_and_process_limits(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where cgroups are not writable the launcher falls back to rlimits, and says so."""
    monkeypatch.setattr(cg, "detect", lambda: "rlimits")
    executor = BubblewrapExecutor(ROOT, prestart=False)
    assert executor.limits_mode == "rlimits"
    source = REPORT.replace('"nofile"', '"as": resource.getrlimit(resource.RLIMIT_AS), '
                                        '"nproc": resource.getrlimit(resource.RLIMIT_NPROC), '
                                        '"nofile"')
    outcome = run_script(executor, SandboxRequest(f"launch-rl-{os.getpid()}", source, LIMITS),
                         lambda s, q: {})
    assert outcome.reason == "ok", outcome.exit
    seen = eval(outcome.outputs[0]["payload"])
    assert seen["as"] == (LIMITS.memory_bytes,) * 2
    assert seen["nproc"] == (LIMITS.processes,) * 2
    assert seen["cpu"] == (LIMITS.cpu_seconds,) * 2
