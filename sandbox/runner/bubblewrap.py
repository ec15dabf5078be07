"""The bubblewrap backend (the default; daemonless).

The worker (root, or any user) forks; the child joins the job's cgroups, sets rlimits,
drops to a per-job unprivileged uid with no supplementary groups, asks for SIGKILL if
the worker dies, and execs ``bwrap``, which unshares every namespace (user, pid, net,
ipc, uts, cgroup), mounts the host's ``/usr`` and the runtime read-only, a size-capped
tmpfs as ``/tmp``, a fresh ``/proc`` and minimal ``/dev``, clears the environment,
installs the seccomp filter (``sandbox.runner.seccomp``) and runs Python in isolated mode.
Nothing of the host's data directory, keys, database or sockets is mounted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
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
from sandbox.runner.runtime import ensure_runtime
from sandbox.runner.seccomp import program

STDERR_CAP = 64 * 1024
_PR_SET_PDEATHSIG = 1
BOOT = ("import sys; sys.path[:0] = ['/opt/sandbox']; "
        "from sandbox.sdk.bootstrap import main; sys.exit(main())")


def _uid_for(job_id: str) -> int:
    """A per-job unprivileged uid (no passwd entry needed), so per-uid limits and
    signals never reach another job's processes."""
    digest = hashlib.sha256(job_id.encode()).digest()
    return 200_000 + int.from_bytes(digest[:4], "big") % 100_000


class BubblewrapExecutor(Executor):
    name = "bubblewrap"

    def __init__(self, root: Path = Path("/var/lib/sandbox-runtime"),
                 bwrap: str = "bwrap") -> None:
        self.root = root
        self.bwrap = shutil.which(bwrap) or bwrap
        self.limits_mode = cg.detect()

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
        workdir = self.root / "jobs" / request.job_id
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "jobs", 0o711)
        os.chmod(workdir, 0o755)
        script = workdir / "script.py"
        script.write_text(request.script)
        os.chmod(script, 0o644)
        return Prepared(request, workdir, {"site": site})

    def _argv(self, prepared: Prepared, seccomp_fd: int) -> list[str]:
        scratch = str(prepared.request.limits.scratch_bytes)
        argv = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session",
                "--clearenv", "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/tmp",
                "--setenv", "MPLCONFIGDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
                "--hostname", "sandbox",
                "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
                "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
                "--ro-bind", str(prepared.extra["site"]), "/opt/sandbox",
                "--ro-bind", str(prepared.workdir / "script.py"), "/job/script.py",
                "--proc", "/proc", "--dev", "/dev",
                "--size", scratch, "--tmpfs", "/tmp",
                "--chdir", "/tmp", "--seccomp", str(seccomp_fd)]
        if Path("/etc/ld.so.cache").exists():
            argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        argv += ["--remount-ro", "/"]  # the root bwrap builds is a tmpfs: make it read-only
        return [*argv, "--", "/usr/bin/python3", "-I", "-S", "-c", BOOT, "/job/script.py"]

    def _launcher(self, prepared: Prepared, cgroup: cg.Cgroup, seccomp_fd: int) -> list[str]:
        """bash joins the cgroups and sets the rlimits for itself, then execs setpriv,
        which drops to the job's uid (no groups, parent-death SIGKILL) and execs bwrap.
        No Python ``preexec_fn``: forking the large worker process would cost more than
        the whole sandbox start."""
        limits = prepared.request.limits
        uid = _uid_for(prepared.request.job_id)
        steps = [f"echo $$ > {shlex.quote(str(path / 'cgroup.procs'))}" for path in cgroup.paths]
        steps.append(f"ulimit -t {limits.cpu_seconds} -c 0 -n 256 "
                     f"-f {max(1, limits.scratch_bytes // 1024)}")
        if cgroup.mode == "rlimits":
            steps.append(f"ulimit -v {limits.memory_bytes // 1024} -u {limits.processes}")
        bwrap = " ".join(shlex.quote(a) for a in self._argv(prepared, seccomp_fd))
        if os.geteuid() == 0:  # root: drop to the job's own uid
            steps.append(f"exec setpriv --reuid={uid} --regid={uid} --clear-groups "
                         f"--pdeathsig KILL -- {bwrap}")
        else:  # already unprivileged: keep the parent-death signal
            steps.append(f"exec setpriv --pdeathsig KILL -- {bwrap}")
        return ["/bin/bash", "-c", " && ".join(steps)]

    def start(self, prepared: Prepared) -> Running:
        request = prepared.request
        cgroup = cg.create(request.job_id, request.limits)
        read_fd, write_fd = os.pipe()
        os.write(write_fd, program())
        os.close(write_fd)
        try:
            proc = subprocess.Popen(
                self._launcher(prepared, cgroup, read_fd), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(read_fd,),
                close_fds=True, env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
        finally:
            os.close(read_fd)
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
                       {"proc": proc, "cgroup": cgroup, "stderr": stderr, "thread": thread,
                        "started": time.monotonic()})

    def wait(self, running: Running, timeout: float) -> Exit:
        proc: subprocess.Popen[bytes] = running.handle["proc"]
        try:
            proc.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
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
        paths = [cg.ROOT / f"{controller}sandbox" / f"sbx-{prepared.request.job_id[:24]}"
                 for controller in ("", "memory/", "pids/", "cpu/")]
        shutil.rmtree(prepared.workdir, ignore_errors=True)
        existing = [p for p in paths if p.is_dir()]
        if existing:  # the kernel may take a moment to release them: not on the job's path
            threading.Thread(target=cg.Cgroup("cleanup", existing).remove, daemon=True).start()
