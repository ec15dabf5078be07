"""A stub executor with the same contract and NO isolation: for tests of the layers above
(queue, broker session, API) on machines without a sandbox. ``make_executor`` refuses it
when the environment is ``prod``; it never stands in for a missing real backend."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from sandbox.runner.contract import Executor, Exit, Prepared, Running, SandboxRequest


class StubExecutor(Executor):
    name = "stub"

    def check_available(self) -> None:
        return None

    def prepare(self, request: SandboxRequest) -> Prepared:
        workdir = Path(tempfile.mkdtemp(prefix=f"sbx-stub-{request.job_id[:12]}-"))
        (workdir / "script.py").write_text(request.script)
        return Prepared(request, workdir)

    def start(self, prepared: Prepared) -> Running:
        package_root = str(Path(__file__).resolve().parent.parent.parent)
        boot = (f"import sys; sys.path[:0] = [{package_root!r}]; "
                "from sandbox.sdk.bootstrap import main; sys.exit(main())")
        proc = subprocess.Popen([sys.executable, "-I", "-c", boot,
                                 str(prepared.workdir / "script.py")],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=prepared.workdir,
                                env={"PATH": os.environ.get("PATH", "/usr/bin")})
        assert proc.stdin is not None and proc.stdout is not None
        return Running(prepared, proc.stdin, proc.stdout, {"proc": proc})

    def wait(self, running: Running, timeout: float) -> Exit:
        proc: subprocess.Popen[bytes] = running.handle["proc"]
        try:
            proc.wait(timeout=max(timeout, 0))
        except subprocess.TimeoutExpired:
            self.kill(running, "time limit")
            proc.wait()
        stderr = proc.stderr.read(65536).decode(errors="replace") if proc.stderr else ""
        code = proc.returncode
        if running.killed_reason:
            return Exit(None, None, running.killed_reason, stderr)
        if code < 0:
            return Exit(None, -code, "crashed", stderr)
        return Exit(code, None, "ok" if code == 0 else "error", stderr)

    def kill(self, running: Running, reason: str = "killed") -> None:
        if running.killed_reason is None:
            running.killed_reason = reason
        with contextlib.suppress(ProcessLookupError):
            running.handle["proc"].kill()

    def cleanup(self, prepared: Prepared) -> None:
        shutil.rmtree(prepared.workdir, ignore_errors=True)
