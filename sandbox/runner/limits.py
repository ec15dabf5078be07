"""Resource limits for a sandbox: cgroups (v2, or v1 as on hybrid hosts) when writable,
otherwise rlimits — and the mode in force is reported, never silently weaker.

cgroup v2: one directory under ``/sys/fs/cgroup/sandbox/`` with ``memory.max``,
``pids.max`` and ``cpu.max``. cgroup v1: one directory per controller
(``memory``, ``pids``, ``cpu``). The child joins its cgroups before it drops privileges
and execs bubblewrap, so every process of the sandbox is inside.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.runner.contract import Limits

ROOT = Path("/sys/fs/cgroup")


@dataclass
class Cgroup:
    mode: str  # "cgroup2", "cgroup1" or "rlimits"
    paths: list[Path] = field(default_factory=list)

    def join(self, pid: int) -> None:
        for path in self.paths:
            (path / "cgroup.procs").write_text(str(pid))

    def apply(self, limits: Limits) -> None:
        """Write the job's memory, process and CPU limits (allowed while processes run:
        a launcher is started under defaults and given the job's limits at hand-off)."""
        if self.mode == "cgroup2":
            path = self.paths[0]
            (path / "memory.max").write_text(str(limits.memory_bytes))
            with contextlib.suppress(OSError):
                (path / "memory.swap.max").write_text("0")
            (path / "pids.max").write_text(str(limits.processes))
            (path / "cpu.max").write_text("100000 100000")
        elif self.mode == "cgroup1":
            memory, pids, cpu = self.paths
            swap = memory / "memory.memsw.limit_in_bytes"  # only with swap accounting
            # memory <= memory+swap must hold after each write: raise memsw first when
            # raising, lower it last when lowering
            with contextlib.suppress(OSError):
                swap.write_text(str(limits.memory_bytes))
            (memory / "memory.limit_in_bytes").write_text(str(limits.memory_bytes))
            with contextlib.suppress(OSError):
                swap.write_text(str(limits.memory_bytes))
            (pids / "pids.max").write_text(str(limits.processes))
            (cpu / "cpu.cfs_period_us").write_text("100000")
            (cpu / "cpu.cfs_quota_us").write_text("100000")

    def memory_exceeded(self) -> bool:
        """Whether the kernel's OOM killer acted in this cgroup (v2 ``memory.events``,
        v1 ``memory.oom_control``), or v1 recorded hitting the limit."""
        for path in self.paths:
            for name in ("memory.events", "memory.oom_control"):
                stats = path / name
                if not stats.exists():
                    continue
                for line in stats.read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key in ("oom_kill", "oom") and value.strip().isdigit() \
                            and int(value) > 0:
                        return True
            failcnt = path / "memory.failcnt"
            if failcnt.exists() and int(failcnt.read_text().strip() or 0) > 0:
                return True
        return False

    def kill_all(self) -> None:
        for path in self.paths:
            kill = path / "cgroup.kill"
            if kill.exists():
                with contextlib.suppress(OSError):
                    kill.write_text("1")
            procs = path / "cgroup.procs"
            if procs.exists():
                for pid in procs.read_text().split():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(int(pid), 9)

    def remove(self) -> None:
        for path in self.paths:
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    self.kill_all()
                    time.sleep(0.02)


def detect() -> str:
    if (ROOT / "cgroup.controllers").exists() and os.access(ROOT, os.W_OK):
        return "cgroup2"
    if all((ROOT / c).is_dir() and os.access(ROOT / c, os.W_OK)
           for c in ("memory", "pids", "cpu")):
        return "cgroup1"
    return "rlimits"


def create(name: str, limits: Limits) -> Cgroup:
    """A cgroup called ``sbx-<name>`` with the limits written, or the rlimits fallback.
    Names start with the worker's short tag (``runner.staging``) so a sweep can tell
    whose it is."""
    mode = detect()
    name = f"sbx-{name}"
    try:
        if mode == "cgroup2":
            parent = ROOT / "sandbox"
            parent.mkdir(exist_ok=True)
            with contextlib.suppress(OSError):
                (ROOT / "cgroup.subtree_control").write_text("+memory +pids +cpu")
                (parent / "cgroup.subtree_control").write_text("+memory +pids +cpu")
            path = parent / name
            path.mkdir(exist_ok=True)
            cgroup = Cgroup("cgroup2", [path])
        elif mode == "cgroup1":
            paths = []
            for controller in ("memory", "pids", "cpu"):
                path = ROOT / controller / "sandbox" / name
                path.mkdir(parents=True, exist_ok=True)
                paths.append(path)
            cgroup = Cgroup("cgroup1", paths)
        else:
            return Cgroup("rlimits")
        cgroup.apply(limits)
        return cgroup
    except OSError:
        return Cgroup("rlimits")


def cleanup_stale() -> int:
    """Remove the job cgroups of dead workers of this host (their processes are killed
    first: a launcher's parent-death signal should already have done it), and empty
    untagged ones from before tags; return how many were removed."""
    from sandbox.runner.staging import is_dead

    removed = 0
    for base in (ROOT / "sandbox", ROOT / "memory" / "sandbox", ROOT / "pids" / "sandbox",
                 ROOT / "cpu" / "sandbox"):
        if not base.is_dir():
            continue
        for path in base.iterdir():
            if not (path.is_dir() and path.name.startswith("sbx-")):
                continue
            pid, _, rest = path.name[4:].partition("-")
            start = rest.partition("-")[0]
            if pid.isdigit() and start.isdigit():
                if not is_dead(f"{pid}-{start}"):
                    continue
                Cgroup("stale", [path]).remove()
            else:
                with contextlib.suppress(OSError):
                    path.rmdir()
            removed += not path.exists()
    return removed
