"""Launchers for the bubblewrap backend: a process that becomes exactly one sandbox.

A launcher is ``/bin/sh`` started by the worker. As the worker's user (root here) it
joins a fresh cgroup (one directory per controller on v1), then execs ``setpriv``, which
drops to a fresh unprivileged uid with no supplementary groups and a parent-death SIGKILL,
and execs a second shell, which waits for one line on stdin: the job's limits and script
path (``Launcher.hand_off``). That shell sets the job's rlimits and execs bwrap, which
creates the namespaces, mounts, seccomp filter and interpreter. After the line, stdin and
stdout are the broker channel. No Python ``preexec_fn``: forking the large worker process
would cost more than the whole sandbox start.

Why the wait for a line: moving a process into a cgroup waits for an RCU grace period on
cgroup v1 and on v2 without ``favordynmods`` (about 6 ms here, a third of a bare
``python3`` start), and the shells and ``setpriv`` cost a few more. ``Prestart`` keeps one
launcher started ahead, so that cost is paid while the previous job runs. Nothing of a job
is in a launcher before its hand-off, each launcher serves one job only, and the sandbox
itself (namespaces, mounts, seccomp, uid, interpreter) is created after the hand-off.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from sandbox.runner import limits as cg
from sandbox.runner.contract import Limits
from sandbox.runner.seccomp import program
from sandbox.runner.staging import short_tag

BOOT = ("import sys; sys.path[:0] = ['/opt/sandbox']; "
        "from sandbox.sdk.bootstrap import main; sys.exit(main())")
_UID_BASE, _UID_SPAN = 200_000, 100_000
_HAND_OFF_FAILED = 125


def bwrap_argv(bwrap: str, site: Path, seccomp_fd: int) -> list[str]:
    """The bubblewrap command; ``$size`` and ``$script`` are filled in by the waiting
    shell from the hand-off line."""
    argv = [bwrap, "--unshare-all", "--die-with-parent", "--new-session",
            "--clearenv", "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "MPLCONFIGDIR", "/tmp", "--setenv", "LANG", "C.UTF-8",
            "--hostname", "sandbox",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin",
            "--ro-bind", str(site), "/opt/sandbox",
            "--ro-bind", "$script", "/job/script.py",
            "--proc", "/proc", "--dev", "/dev",
            "--size", "$size", "--tmpfs", "/tmp",
            "--chdir", "/tmp", "--seccomp", str(seccomp_fd)]
    if Path("/etc/ld.so.cache").exists():
        argv += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    argv += ["--remount-ro", "/"]  # the root bwrap builds is a tmpfs: make it read-only
    return [*argv, "--", "/usr/bin/python3", "-I", "-S", "-c", BOOT, "/job/script.py"]


def _quote(word: str) -> str:
    return f'"{word}"' if word.startswith("$") else shlex.quote(word)


def _waiting_shell(argv: list[str]) -> str:
    """The unprivileged shell's program: read the hand-off line, set the rlimits (one
    ``ulimit`` per limit, the letters dash and bash share; the process limit of the
    rlimits fallback through ``prlimit``, whose letter differs between shells), exec."""
    command = " ".join(_quote(word) for word in argv)
    return (f"read -r cpu fsize vmem nproc size script || exit {_HAND_OFF_FAILED}\n"
            f"ulimit -t \"$cpu\" && ulimit -c 0 && ulimit -n 256 && ulimit -f \"$fsize\" "
            f"|| exit {_HAND_OFF_FAILED}\n"
            f"if [ \"$vmem\" != - ]; then ulimit -v \"$vmem\" || exit {_HAND_OFF_FAILED}; fi\n"
            f"if [ \"$nproc\" != - ]; then exec prlimit --nproc=\"$nproc\" {command}; fi\n"
            f"exec {command}\n")


@dataclass
class Launcher:
    """A started launcher waiting for its job (see the module docstring)."""

    proc: subprocess.Popen[bytes]
    cgroup: cg.Cgroup
    uid: int
    site: Path

    @classmethod
    def start(cls, bwrap: str, site: Path) -> Launcher:
        """Start a launcher under default limits, in a fresh cgroup of its own."""
        name = f"{short_tag()}-{secrets.token_hex(4)}"
        cgroup = cg.create(name, Limits())
        uid = _UID_BASE + secrets.randbelow(_UID_SPAN)
        read_fd, write_fd = os.pipe()
        os.write(write_fd, program())
        os.close(write_fd)
        inner = _waiting_shell(bwrap_argv(bwrap, site, read_fd))
        steps = [f"echo $$ > {shlex.quote(str(p / 'cgroup.procs'))}" for p in cgroup.paths]
        if os.geteuid() == 0:  # root: drop to a uid of the sandbox's own
            steps.append(f"exec setpriv --reuid={uid} --regid={uid} --clear-groups "
                         f"--pdeathsig KILL -- /bin/sh -c {shlex.quote(inner)}")
        else:  # already unprivileged: keep the parent-death signal
            uid = os.geteuid()
            steps.append(f"exec setpriv --pdeathsig KILL -- /bin/sh -c {shlex.quote(inner)}")
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", " && ".join(steps)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(read_fd,),
                close_fds=True, env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
        except BaseException:
            cgroup.remove()
            raise
        finally:
            os.close(read_fd)
        return cls(proc, cgroup, uid, site)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand_off(self, limits: Limits, script: Path) -> None:
        """Give the launcher its job: the job's cgroup limits, then the line that makes
        it set the rlimits and exec bwrap on ``script``."""
        if any(c.isspace() for c in str(script)) or not script.is_absolute():
            raise ValueError("the script path must be absolute, without whitespace")
        self.cgroup.apply(limits)
        vmem = str(limits.memory_bytes // 1024) if self.cgroup.mode == "rlimits" else "-"
        nproc = str(limits.processes) if self.cgroup.mode == "rlimits" else "-"
        fsize = max(1, limits.scratch_bytes // 512)  # POSIX sh: 512-byte blocks
        line = (f"{int(limits.cpu_seconds)} {fsize} {vmem} {nproc} "
                f"{int(limits.scratch_bytes)} {script}\n")
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode())
        self.proc.stdin.flush()

    def discard(self) -> None:
        """Kill an unused launcher and remove its cgroup. Idempotent."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, 9)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.cgroup.remove()


class Prestart:
    """At most one launcher started ahead. ``take`` hands it out (or starts one on the
    spot when there is none, or it died, or the runtime changed); ``refill``, called once
    the job has its launcher, starts the next in the background, so its start overlaps
    the job rather than delaying it. Thread-safe; ``close`` discards the waiting one."""

    def __init__(self, bwrap: str, enabled: bool = True) -> None:
        self.bwrap = bwrap
        self.enabled = enabled
        self._lock = threading.Lock()
        self._ready: Launcher | None = None
        self._closed = False

    def take(self, site: Path) -> Launcher:
        with self._lock:
            ready, self._ready = self._ready, None
        if ready is not None and not (ready.alive() and ready.site == site):
            ready.discard()
            ready = None
        return ready or Launcher.start(self.bwrap, site)

    def refill(self, site: Path) -> None:
        if self.enabled and not self._closed:
            threading.Thread(target=self._refill, args=(site,), daemon=True,
                             name="sandbox-prestart").start()

    def _refill(self, site: Path) -> None:
        try:
            launcher = Launcher.start(self.bwrap, site)
        except OSError:
            return  # the next job starts one on the spot
        with self._lock:
            if self._ready is None and not self._closed:
                self._ready = launcher
                return
        launcher.discard()  # one is waiting already, or the executor was closed

    def close(self) -> None:
        with self._lock:
            ready, self._ready, self._closed = self._ready, None, True
        if ready is not None:
            ready.discard()
