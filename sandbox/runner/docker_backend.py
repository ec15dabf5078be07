"""The Docker backend (production): one fresh container per job, through the Docker SDK.

The container runs the runner image (``runner_images/``: Python, the SDK and the allowed
libraries, nothing else; built offline by ``scripts/docker-setup.sh``) with no network
(``network_mode=none``), a read-only root, every capability dropped, no-new-privileges,
uid/gid 65534, a private IPC namespace without ``/dev/shm``, pids/memory (no swap)/CPU
limits, rlimits for CPU seconds, file size and open files, a size-capped ``/tmp`` tmpfs,
an environment of PATH/HOME/MPLCONFIGDIR/LANG only (and Docker's HOSTNAME=sandbox), no
log driver (the daemon keeps no copy of what the script says), and optionally the gVisor
runtime (``runtime="runsc"``). The script is bind-mounted read-only at
``/job/script.py`` (the engine must be local: it reads the job directory). The command
is ``python3 -I -S -c CODE /job/script.py`` where CODE installs the bubblewrap backend's
seccomp filter on top of the engine's profile and then runs the same bootstrap as
bubblewrap (``BOOT``); see ``boot_command``.

The broker channel is the container's stdin/stdout over one attach connection, opened
before the container starts so nothing is lost. Docker multiplexes stdout and stderr on
it in frames (an 8-byte header: stream type, three zero bytes, a big-endian length);
``Running.stdout`` returns only stdout bytes, stderr goes to a capped buffer reported
by ``wait``. ``Running.stdin.close()`` half-closes the connection, which closes the
container's stdin (``StdinOnce``) and leaves stdout open.
"""

from __future__ import annotations

import contextlib
import io
import logging
import platform
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from sandbox.runner.contract import (
    Executor,
    Exit,
    IsolationUnavailable,
    Prepared,
    Running,
    SandboxRequest,
)
from sandbox.runner.launcher import BOOT
from sandbox.runner.staging import is_dead, my_tag, stage_script, sweep_staged

STDERR_CAP = 64 * 1024
# gVisor's own kernel (the Sentry, a Go program) runs in the container's pids cgroup and
# needs threads of its own; the script's processes live inside it.
RUNSC_PIDS_HEADROOM = 128
PENDING_CAP = 16 * 1024 * 1024  # stdout kept for a late reader once the job has ended
ENVIRONMENT = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp",
               "MPLCONFIGDIR": "/tmp", "LANG": "C.UTF-8"}
ALLOWED_IMAGE_ENV = {*ENVIRONMENT, "HOSTNAME"}
SETUP_HINT = "run scripts/docker-setup.sh"
LABEL = "org.sandbox.executor"
WORKER_LABEL = "org.sandbox.worker"  # host:pid:start of the worker (runner.staging)
_STDOUT, _STDERR = 1, 2

log = logging.getLogger(__name__)


def boot_command() -> list[str]:
    """``python3 -I -S -c CODE /job/script.py``: CODE installs the bubblewrap backend's
    seccomp filter (``sandbox.runner.seccomp``: ptrace, mount, unshare, setns, keyctl,
    bpf, perf_event_open, TIOCSTI ... refused) on top of the engine's own profile, then
    runs the same bootstrap as bubblewrap (``BOOT``). The container has no_new_privs, so
    the filter needs no privilege; if it cannot be installed the job ends (status 126)
    before any analyst code runs."""
    from sandbox.runner.seccomp import program

    code = (
        "import ctypes, sys\n"
        f"_p = bytes.fromhex('{program().hex()}')\n"
        "_b = ctypes.create_string_buffer(_p, len(_p))\n"
        "class _F(ctypes.Structure):\n"
        "    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_void_p)]\n"
        "_f = _F(len(_p) // 8, ctypes.addressof(_b))\n"
        "_libc = ctypes.CDLL(None, use_errno=True)\n"
        "_u = ctypes.c_ulong\n"  # PR_SET_SECCOMP (22), SECCOMP_MODE_FILTER (2)
        "if _libc.prctl(22, _u(2), ctypes.byref(_f), _u(0), _u(0)) != 0:\n"
        "    sys.stderr.write('sandbox: seccomp filter refused (errno %d)\\n'"
        " % ctypes.get_errno())\n"
        "    sys.exit(126)\n"
        "del _p, _b, _F, _f, _libc, _u\n"
        + BOOT
    )
    return ["python3", "-I", "-S", "-c", code, "/job/script.py"]


class _Demux(io.RawIOBase):
    """The read side of Docker's multiplexed attach stream: ``readinto`` yields stdout
    payload only; stderr frames go to ``stderr`` (capped). Thread-safe."""

    def __init__(self, sock: socket.socket, stderr_cap: int = STDERR_CAP) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._left = 0  # stdout bytes still to come in the current frame
        self._pending = bytearray()
        self._eof = False
        self._stderr_cap = stderr_cap
        self.stderr = bytearray()

    def readable(self) -> bool:
        return True

    def _recv(self, n: int) -> bytes:
        try:
            return self._sock.recv(n)
        except OSError:  # reset, closed by cleanup: the stream is over
            return b""

    def _recv_exact(self, n: int) -> bytes | None:
        chunks, got = [], 0
        while got < n:
            chunk = self._recv(n - got)
            if not chunk:
                return None
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _next_frame(self) -> None:
        """Consume one header (and a whole non-stdout frame); sets ``_left`` or ``_eof``."""
        header = self._recv_exact(8)
        if header is None:
            self._eof = True
            return
        kind, length = header[0], int.from_bytes(header[4:8], "big")
        if kind == _STDOUT:
            self._left = length
            return
        remaining = length
        while remaining:
            chunk = self._recv(min(remaining, 65536))
            if not chunk:
                self._eof = True
                return
            remaining -= len(chunk)
            if kind == _STDERR and len(self.stderr) < self._stderr_cap:
                self.stderr += chunk[: self._stderr_cap - len(self.stderr)]

    def _read_stdout(self, n: int) -> bytes:
        """Up to ``n`` stdout bytes from the socket; b"" at the end. Lock held."""
        while not self._eof:
            if self._left:
                chunk = self._recv(min(n, self._left))
                if not chunk:
                    self._eof = True
                    break
                self._left -= len(chunk)
                return chunk
            self._next_frame()
        return b""

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if not len(view):
            return 0
        with self._lock:
            if self._pending:
                n = min(len(view), len(self._pending))
                view[:n] = self._pending[:n]
                del self._pending[:n]
                return n
            chunk = self._read_stdout(len(view))
            view[: len(chunk)] = chunk
            return len(chunk)

    def drain(self, timeout: float) -> None:
        """Read the stream to its end (for stderr), keeping stdout for a late reader; at
        most ``timeout`` seconds in all. A reader blocked in ``read`` holds the lock and
        consumes stderr frames itself."""
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            return
        try:
            while not self._eof:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                with contextlib.suppress(OSError):
                    self._sock.settimeout(remaining)
                chunk = self._read_stdout(65536)  # a timeout reads as the end
                if len(self._pending) < PENDING_CAP:
                    self._pending += chunk[: PENDING_CAP - len(self._pending)]
        finally:
            with contextlib.suppress(OSError):
                self._sock.settimeout(None)
            self._lock.release()


class _Stdin(io.RawIOBase):
    """The write side: bytes go to the container's stdin; ``close`` half-closes."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed sandbox stdin")
        payload = bytes(data)
        self._sock.sendall(payload)
        return len(payload)

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_WR)
        super().close()


class DockerExecutor(Executor):
    name = "docker"

    def __init__(self, image: str = "sandbox-runner:latest", runtime: str | None = None,
                 root: Path = Path("/var/lib/sandbox-runtime"), *, cpus: float = 1.0,
                 client: Any = None, check_runtime_key: bool = True) -> None:
        self.image = image
        self.runtime = runtime or None
        self.root = root
        self.cpus = cpus
        self.check_runtime_key = check_runtime_key
        self._client = client

    @property
    def _gvisor(self) -> bool:
        return bool(self.runtime and "runsc" in self.runtime)

    # -- the engine -------------------------------------------------------------------

    def _docker(self) -> Any:
        if self._client is None:
            try:
                import docker
            except ImportError as exc:  # pragma: no cover - a dependency of the project
                raise IsolationUnavailable("the Docker SDK (pip install docker) is missing; "
                                           "script jobs are refused") from exc
            try:
                self._client = docker.from_env(timeout=60)
            except docker.errors.DockerException as exc:
                raise IsolationUnavailable(
                    f"no Docker engine reachable ({exc}); {SETUP_HINT}; script jobs are "
                    "refused") from None
        return self._client

    def check_available(self) -> None:
        import docker.errors
        import requests

        if platform.machine() != "x86_64":
            raise IsolationUnavailable("the sandbox's seccomp filter is written for x86-64; "
                                       "script jobs are refused on " + platform.machine())
        client = self._docker()
        try:
            client.ping()
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise IsolationUnavailable(
                f"the Docker engine does not answer ({type(exc).__name__}: {exc}); "
                f"{SETUP_HINT}; script jobs are refused") from None
        try:
            attrs = client.api.inspect_image(self.image)
        except docker.errors.ImageNotFound:
            raise IsolationUnavailable(
                f"the runner image {self.image} is not in the Docker engine; {SETUP_HINT} "
                "(builds it offline) or build runner_images/Dockerfile") from None
        config = attrs.get("Config") or {}
        extra = sorted({item.partition("=")[0] for item in config.get("Env") or []}
                       - ALLOWED_IMAGE_ENV)
        if extra:
            raise IsolationUnavailable(
                f"the runner image {self.image} sets environment variables {extra}; the "
                "sandbox environment must hold only " + ", ".join(sorted(ENVIRONMENT)))
        key = (config.get("Labels") or {}).get("org.sandbox.runtime-key")
        if self.check_runtime_key and key:
            from sandbox.runner.runtime import runtime_key
            wanted = runtime_key()
            if key != wanted:
                raise IsolationUnavailable(
                    f"the runner image {self.image} holds runtime {key}, this server needs "
                    f"{wanted} (the SDK or a library changed); {SETUP_HINT}")
        if self.runtime:
            runtimes = (client.info().get("Runtimes") or {})
            if self.runtime not in runtimes:
                raise IsolationUnavailable(
                    f"the container runtime {self.runtime!r} is not configured in the Docker "
                    f"engine (it has {sorted(runtimes)}); script jobs are refused")

    # -- one job ----------------------------------------------------------------------

    @staticmethod
    def container_name(job_id: str) -> str:
        return f"sandbox-job-{job_id}"

    def prepare(self, request: SandboxRequest) -> Prepared:
        workdir = stage_script(self.root, request.job_id, request.script)
        return Prepared(request, workdir, {"script": workdir / "script.py",
                                           "container": self.container_name(request.job_id)})

    def _host_config(self, client: Any, prepared: Prepared) -> Any:
        from docker.types import LogConfig, Ulimit

        limits = prepared.request.limits
        return client.api.create_host_config(
            binds={str(prepared.extra["script"]): {"bind": "/job/script.py", "mode": "ro"}},
            network_mode="none",
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            ipc_mode="none",
            pids_limit=limits.processes + (RUNSC_PIDS_HEADROOM if self._gvisor else 0),
            mem_limit=limits.memory_bytes,
            memswap_limit=limits.memory_bytes,
            nano_cpus=int(self.cpus * 1e9),
            oom_score_adj=1000,
            tmpfs={"/tmp": f"size={limits.scratch_bytes},mode=1777"},
            ulimits=[Ulimit(name="cpu", soft=limits.cpu_seconds, hard=limits.cpu_seconds + 1),
                     Ulimit(name="core", soft=0, hard=0),
                     Ulimit(name="fsize", soft=limits.scratch_bytes, hard=limits.scratch_bytes),
                     Ulimit(name="nofile", soft=256, hard=256)],
            log_config=LogConfig(type="none"),
            runtime=self.runtime,
        )

    def start(self, prepared: Prepared) -> Running:
        import docker.errors
        import requests

        existing = prepared.extra.get("running")
        if isinstance(existing, Running):
            return existing
        client = self._docker()
        name = prepared.extra["container"]
        self._remove(client, name)  # left by a worker that died before cleanup
        config = client.api.create_container_config(
            self.image,
            command=boot_command(),
            entrypoint=[""],
            hostname="sandbox",
            user="65534:65534",
            detach=True,
            stdin_open=True,
            tty=False,
            environment=dict(ENVIRONMENT),
            working_dir="/tmp",
            network_disabled=True,
            labels={LABEL: self.name, "org.sandbox.job": prepared.request.job_id,
                    WORKER_LABEL: my_tag()},
            host_config=self._host_config(client, prepared),
            runtime=self.runtime,
        )
        config["StdinOnce"] = True  # our half-close ends stdin, not the stdout stream
        attached: Any = None
        sock: socket.socket | None = None
        try:
            ident = client.api.create_container_from_config(config, name=name)["Id"]
            prepared.extra["container_id"] = ident
            attached = client.api.attach_socket(
                ident, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
            sock = self._own_socket(attached)
            started = time.monotonic()
            client.api.start(ident)
        except (docker.errors.APIError, requests.RequestException) as exc:
            for handle in (sock, attached):
                with contextlib.suppress(Exception):
                    if handle is not None:
                        handle.close()
            self._remove(client, name)
            detail = getattr(exc, "explanation", None) or exc
            raise IsolationUnavailable(
                f"the Docker engine could not start the sandbox: {detail}") from None
        demux = _Demux(sock)
        running = Running(prepared, io.BufferedWriter(_Stdin(sock)),
                          io.BufferedReader(demux),
                          {"client": client, "id": ident, "socket": sock, "demux": demux,
                           "attached": attached, "started": started})
        prepared.extra["running"] = running
        return running

    @staticmethod
    def _own_socket(attached: Any) -> socket.socket:
        """A socket of our own on the attach connection (a duplicate of the SDK's), so
        that closing it never depends on the SDK's objects; those are kept (in the
        handle) until cleanup so the HTTP connection is never handed back to the pool."""
        raw = getattr(attached, "_sock", attached)
        try:
            mine: socket.socket = raw.dup()
        except (AttributeError, NotImplementedError, OSError):  # TLS: use the SDK's
            return raw
        mine.settimeout(None)
        return mine

    def wait(self, running: Running, timeout: float) -> Exit:
        import docker.errors
        import requests

        client, ident = running.handle["client"], running.handle["id"]
        try:
            client.api.wait(ident, timeout=max(timeout, 0.01))
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            self.kill(running, "time limit")
            with contextlib.suppress(requests.RequestException, docker.errors.APIError):
                client.api.wait(ident, timeout=30)
        demux: _Demux = running.handle["demux"]
        demux.drain(timeout=5)
        stderr = bytes(demux.stderr).decode(errors="replace")
        try:
            state = client.api.inspect_container(ident)["State"]
        except docker.errors.APIError:
            state = {"ExitCode": -1, "OOMKilled": False}
        code = int(state.get("ExitCode", -1))
        status: int | None = code
        sig: int | None = None
        if 128 < code <= 128 + 64:  # PID 1 died of a signal (128 + signal number)
            status, sig = None, code - 128
        if running.killed_reason:
            reason = running.killed_reason
        elif state.get("OOMKilled") or "MemoryError" in stderr:
            reason = "memory limit"
        elif sig == signal.SIGXCPU:
            reason = "time limit"
        elif sig == signal.SIGKILL:
            reason = "killed"
        elif sig is not None:
            reason = "crashed"
        else:
            reason = "ok" if code == 0 else "error"
        return Exit(status, sig, reason, stderr)

    def kill(self, running: Running, reason: str = "killed") -> None:
        import docker.errors
        import requests

        if running.killed_reason is None:
            running.killed_reason = reason
        with contextlib.suppress(docker.errors.APIError, requests.RequestException):
            running.handle["client"].api.kill(running.handle["id"], signal="SIGKILL")

    def _remove(self, client: Any, name: str) -> None:
        import docker.errors
        import requests

        try:
            client.api.remove_container(name, force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409 or "in progress" not in str(exc):
                raise
        except requests.RequestException as exc:
            log.warning("could not remove container %s: %s", name, exc)

    def cleanup(self, prepared: Prepared) -> None:
        running = prepared.extra.get("running")
        if isinstance(running, Running):
            for stream in (running.stdin, running.stdout):
                with contextlib.suppress(Exception):
                    stream.close()
            for handle in (running.handle["socket"], running.handle["attached"]):
                with contextlib.suppress(Exception):
                    handle.close()
        name = prepared.extra.get("container") or self.container_name(prepared.request.job_id)
        if self._client is not None or running is not None or "container_id" in prepared.extra:
            try:
                self._remove(self._docker(), name)
            except IsolationUnavailable as exc:
                log.warning("container %s not removed: %s", name, exc)
        shutil.rmtree(prepared.workdir, ignore_errors=True)

    def sweep(self) -> int:
        """Containers and staged scripts of dead workers of this host (containers of
        live workers, and of other hosts sharing the daemon, are left alone)."""
        client = self._docker()
        found = client.api.containers(all=True, filters={"label": f"{LABEL}={self.name}"})
        removed = 0
        for container in found:
            tag = (container.get("Labels") or {}).get(WORKER_LABEL)
            if tag is None or is_dead(tag):  # untagged: made before tags existed
                self._remove(client, container["Id"])
                removed += 1
        return removed + sweep_staged(self.root)
