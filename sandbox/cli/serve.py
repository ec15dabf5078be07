"""Running the service: the API under uvicorn and worker processes beside it."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from contextlib import suppress

import uvicorn

from sandbox.api.app import create_app
from sandbox.config import Settings
from sandbox.jobs.worker import Worker
from sandbox.runtime import Runtime

log = logging.getLogger("sandbox.serve")
_PR_SET_PDEATHSIG = 1


def run_worker(settings: Settings) -> None:
    """Run one worker loop until SIGTERM or SIGINT."""
    runtime = Runtime.open(settings)
    worker = Worker(settings, runtime.db, runtime.keys)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    try:
        worker.run_forever()
    finally:
        runtime.close()


def _die_with_parent() -> None:
    """In the child before exec: receive SIGTERM when the parent dies (Linux prctl)."""
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn_workers(count: int) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` worker processes with this process's environment.

    Workers die with the server even if it is killed with SIGKILL (parent-death signal).
    """
    return [subprocess.Popen([sys.executable, "-m", "sandbox.cli.main", "worker"],
                             env=dict(os.environ), preexec_fn=_die_with_parent)
            for _ in range(count)]


def stop_processes(processes: list[subprocess.Popen[bytes]], timeout: float = 10.0) -> None:
    for proc in processes:
        with suppress(ProcessLookupError):
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def serve(settings: Settings, *, workers: int = 1) -> None:
    """API and ``workers`` worker processes until interrupted; workers stop with it."""
    runtime = Runtime.open(settings)  # migrates once before workers start
    processes = spawn_workers(workers)
    # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; with the default
    # handler that would kill this process before the workers are stopped.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        uvicorn.run(create_app(runtime), host=settings.host, port=settings.port,
                    log_level="warning", access_log=False)
    finally:
        stop_processes(processes)
        runtime.close()
