"""Staging a job's script, and knowing which worker made a sandbox resource.

``stage_script`` writes the script into ``<root>/jobs/<job id>.<worker>/`` (world-readable:
the sandbox's uid reads it through a read-only bind mount), with the worker's tag in
``.owner`` (not mounted). The directory is per worker as well as per job, so a stale
worker cleaning up after a job that another worker has taken over cannot remove the new
attempt's script.

Every launcher cgroup, staged job directory and container carries its worker's tag: the
host name, the pid and the pid's start time (clock ticks since boot, from
``/proc/<pid>/stat``), so a recycled pid is not mistaken for the worker that died. A sweep
at worker start removes only what dead workers of this host left; a live worker's
sandboxes are never touched, and resources of other hosts (a shared Docker daemon) are
left to their own workers.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from pathlib import Path

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
LEGACY_AGE_SECONDS = 3600.0


def _start_ticks(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ")"
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[19]  # field 22, starttime


def my_tag() -> str:
    """This process's tag, ``host:pid:start``."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def short_tag() -> str:
    """``pid-start`` for names that must stay short (cgroup directories)."""
    _host, pid, start = my_tag().rsplit(":", 2)
    return f"{pid}-{start}"


def is_dead(tag: str) -> bool:
    """Whether the worker that wrote ``tag`` (full or short form) is gone from this host.
    Unparseable tags, and tags of other hosts, count as alive: never remove on doubt."""
    host, sep, rest = tag.partition(":")
    if sep:
        if host != socket.gethostname():
            return False
        pid_text, _, start = rest.partition(":")
    else:
        pid_text, _, start = tag.partition("-")
    if not pid_text.isdigit() or not start:
        return False
    return _start_ticks(int(pid_text)) != start


def stage_script(root: Path, job_id: str, script: str) -> Path:
    """Write ``script`` for ``job_id``; return its directory. Idempotent per job and worker."""
    if not _JOB_ID.fullmatch(job_id):
        raise ValueError(f"job id {job_id!r} is not a plain name")
    jobs = root / "jobs"
    workdir = jobs / f"{job_id}.{short_tag()}"
    workdir.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    jobs.chmod(0o711)
    workdir.chmod(0o755)
    (workdir / ".owner").write_text(my_tag())
    path = workdir / "script.py"
    path.write_text(script)
    path.chmod(0o644)
    return workdir


def sweep_staged(root: Path) -> int:
    """Remove job directories whose worker is dead (and untagged ones older than an
    hour, from before tags); return how many were removed."""
    jobs = root / "jobs"
    removed = 0
    if not jobs.is_dir():
        return 0
    for workdir in jobs.iterdir():
        try:
            tag = (workdir / ".owner").read_text().strip()
            stale = is_dead(tag)
        except FileNotFoundError:
            stale = time.time() - workdir.stat().st_mtime > LEGACY_AGE_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(workdir, ignore_errors=True)
            removed += 1
    return removed
