"""The executor contract every isolation backend implements (bubblewrap, Docker, stub).

Each method is idempotent: calling it again after success changes nothing, so a worker
that retries after an error cannot leak a process or a directory. The sandboxed process
gets the analyst's script, the runtime (interpreter, SDK, allowed libraries) read-only, a
size-capped scratch tmpfs, no network, no secrets, a cleared environment, and stdin and
stdout as the broker channel (``sandbox.sdk.protocol``). Its stderr is captured, capped,
for interpreter crashes only.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any


@dataclass(frozen=True)
class Limits:
    """Per-job limits (from policy)."""

    wall_seconds: float = 60.0
    cpu_seconds: int = 60
    memory_bytes: int = 1024 * 1024 * 1024
    processes: int = 64
    output_bytes: int = 4 * 1024 * 1024
    scratch_bytes: int = 64 * 1024 * 1024
    queries: int = 100


@dataclass(frozen=True)
class SandboxRequest:
    job_id: str
    script: str
    limits: Limits = field(default_factory=Limits)


@dataclass
class Prepared:
    """What ``prepare`` staged for one job (backend-specific details in ``extra``)."""

    request: SandboxRequest
    workdir: Path
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Running:
    """A started sandbox: the channel streams and the backend's handle."""

    prepared: Prepared
    stdin: IO[bytes]  # broker -> sandbox
    stdout: IO[bytes]  # sandbox -> broker (frames only)
    handle: Any = None
    killed_reason: str | None = None


@dataclass(frozen=True)
class Exit:
    status: int | None  # exit code, or None if killed by a signal
    signal: int | None
    reason: str  # "ok", "error", "time limit", "memory limit", "killed", "crashed"
    stderr: str = ""


class IsolationUnavailable(Exception):
    """The configured isolation cannot run here; jobs are refused, never run weaker."""


class Executor(abc.ABC):
    """See the module docstring."""

    name: str = "abstract"

    @abc.abstractmethod
    def check_available(self) -> None:
        """Raise ``IsolationUnavailable`` naming what is missing; return if usable."""

    @abc.abstractmethod
    def prepare(self, request: SandboxRequest) -> Prepared:
        """Stage the script and the job's private directory. Idempotent per job id."""

    @abc.abstractmethod
    def start(self, prepared: Prepared) -> Running:
        """Launch the sandboxed interpreter on the script; return the channel."""

    @abc.abstractmethod
    def wait(self, running: Running, timeout: float) -> Exit:
        """Wait up to ``timeout`` seconds for the sandbox to end; kill it if it does not.
        The returned reason says why it ended."""

    @abc.abstractmethod
    def kill(self, running: Running, reason: str = "killed") -> None:
        """Kill every process of the sandbox. Idempotent."""

    @abc.abstractmethod
    def cleanup(self, prepared: Prepared) -> None:
        """Remove everything ``prepare``/``start`` created. Idempotent."""

    def close(self) -> None:  # noqa: B027 (optional: most backends keep nothing)
        """Release what the executor keeps between jobs (bubblewrap: the launcher started
        ahead). Idempotent; a job run afterwards still works, it only starts cold."""

    def sweep(self) -> int:
        """Remove what sandboxes of dead workers of this host left behind (cgroups,
        containers, staged scripts); never touch a live worker's. Called when a worker
        starts. Idempotent; returns how many things were removed."""
        return 0
