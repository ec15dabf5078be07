"""The bubblewrap backend (the default; daemonless).

Each job gets a launcher (``sandbox.runner.launcher``): a shell in a cgroup of its own,
dropped to an unprivileged uid of its own with no supplementary groups and a SIGKILL if
the worker dies, which on hand-off sets the job's rlimits and execs ``bwrap``. bwrap
unshares every namespace (user, pid, net, ipc, uts, cgroup), mounts the host's ``/usr``
and the runtime read-only, a size-capped tmpfs as ``/tmp``, a fresh ``/proc`` and minimal
``/dev``, clears the environment, installs the seccomp filter (``sandbox.runner.seccomp``)
and runs Python in isolated mode. Nothing of the host's data directory, keys, database or
sockets is mounted.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path

from sandbox.runner import limits as cg
from sandbox.runner.contract import (
    Executor,
    Exit,
    IsolationUnavailable,
    Prepared,
    Running,
    SandboxRequest,
)
from sandbox.runner.launcher import Prestart
from sandbox.runner.runtime import ensure_runtime
from sandbox.runner.staging import stage_script, sweep_staged

STDERR_CAP = 64 * 1024


def _exited_within(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the process ends within ``timeout`` s, told by its pidfd becoming readable.
    (``Popen.wait(timeout)`` polls with sleeps that grow to 50 ms: a third of a sandbox's
    whole start-to-exit time.)"""
    if proc.poll() is not None:
        return True
    try:
        fd = os.pidfd_open(proc.pid)
    except OSError:  # already reaped by someone, or no pidfd on this kernel
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


class BubblewrapExecutor(Executor):
    name = "bubblewrap"

    def __init__(self, root: Path = Path("/var/lib/sandbox-runtime"),
                 bwrap: str = "bwrap", prestart: bool = True) -> None:
        self.root = root
        self.bwrap = shutil.which(bwrap) or bwrap
        self.limits_mode = cg.detect()
        self.prestart = Prestart(self.bwrap, enabled=prestart)
        weakref.finalize(self, self.prestart.close)

    def check_available(self) -> None:
        if not shutil.which(self.bwrap):
            raise IsolationUnavailable("bubblewrap is not installed (apt-get install "
                                       "bubblewrap); script jobs are refused")
        drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"] \
            if os.geteuid() == 0 else []
        try:
            probe = subprocess.run(
                [*drop, self.bwrap, "--unshare-all", "--ro-bind", "/usr", "/usr", "--symlink",
                 "usr/lib64", "/lib64", "--symlink", "usr/lib", "/lib", "--", "/usr/bin/true"],
                capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as exc:
            raise IsolationUnavailable(f"bubblewrap could not be started: {exc}") from None
        if probe.returncode != 0:
            raise IsolationUnavailable("bubblewrap cannot create namespaces here: "
                                       f"{probe.stderr.decode(errors='replace')[:200]}")

    def prepare(self, request: SandboxRequest) -> Prepared:
        site = ensure_runtime(self.root)
        workdir = stage_script(self.root, request.job_id, request.script)
        return Prepared(request, workdir, {"site": site})

    def start(self, prepared: Prepared) -> Running:
        request = prepared.request
        site = prepared.extra["site"]
        launcher = self.prestart.take(site)
        prepared.extra["cgroup"] = launcher.cgroup  # for cleanup, even without a Running
        try:
            launcher.hand_off(request.limits, prepared.workdir / "script.py")
        except BaseException:
            launcher.discard()
            raise
        finally:
            self.prestart.refill(site)
        proc = launcher.proc
        stderr: list[bytes] = []

        def drain() -> None:
            assert proc.stderr is not None
            total = 0
            while chunk := proc.stderr.read(4096):
                if total < STDERR_CAP:
                    stderr.append(chunk[:STDERR_CAP - total])
                    total += len(chunk)

        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        assert proc.stdin is not None and proc.stdout is not None
        return Running(prepared, proc.stdin, proc.stdout,
                       {"proc": proc, "cgroup": launcher.cgroup, "stderr": stderr,
                        "thread": thread, "uid": launcher.uid,
                        "started": time.monotonic()})

    def wait(self, running: Running, timeout: float) -> Exit:
        proc: subprocess.Popen[bytes] = running.handle["proc"]
        if not _exited_within(proc, max(timeout, 0)):
            self.kill(running, "time limit")
        proc.wait()
        running.handle["thread"].join(timeout=5)
        stderr = b"".join(running.handle["stderr"]).decode(errors="replace")
        cgroup: cg.Cgroup = running.handle["cgroup"]
        code = proc.returncode
        status: int | None = code if code >= 0 else None
        sig: int | None = -code if code < 0 else None
        if code > 128:  # bwrap reports its child's signal as 128+n
            status, sig = None, code - 128
        if running.killed_reason:
            reason = running.killed_reason
        elif cgroup.memory_exceeded() or "MemoryError" in stderr:
            reason = "memory limit"
        elif sig in (signal.SIGXCPU, signal.SIGKILL) and \
                time.monotonic() - running.handle["started"] < timeout:
            reason = "time limit" if sig == signal.SIGXCPU else "killed"
        elif sig is not None:
            reason = "crashed"
        else:
            reason = "ok" if code == 0 else "error"
        return Exit(status, sig, reason, stderr)

    def kill(self, running: Running, reason: str = "killed") -> None:
        if running.killed_reason is None:
            running.killed_reason = reason
        cgroup: cg.Cgroup = running.handle["cgroup"]
        cgroup.kill_all()
        proc: subprocess.Popen[bytes] = running.handle["proc"]
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()

    def cleanup(self, prepared: Prepared) -> None:
        shutil.rmtree(prepared.workdir, ignore_errors=True)
        cgroup: cg.Cgroup | None = prepared.extra.pop("cgroup", None)
        if cgroup is not None and cgroup.paths:
            # the kernel may take a moment to release it: not on the job's path
            threading.Thread(target=cgroup.remove, daemon=True).start()

    def close(self) -> None:
        """Discard the launcher started ahead (see ``sandbox.runner.launcher``)."""
        self.prestart.close()

    def sweep(self) -> int:
        """Launcher cgroups and staged scripts of dead workers of this host."""
        return cg.cleanup_stale() + sweep_staged(self.root)
