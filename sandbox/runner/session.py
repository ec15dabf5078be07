"""The trusted side of a script job: run the sandbox, answer its queries, collect outputs.

``run_script`` starts the script through an ``Executor``, reads frames from the sandbox
(on a reader thread, so a silent script cannot block the worker past its wall-clock
limit), answers each ``query`` with ``answer(seq, spec)`` (the caller charges the ledger
and runs the engine), pads each reply to the policy's timing quantum, and collects
``emit`` outputs and ``log`` lines under byte caps. Outputs travel only through the
channel: no file written in the sandbox is ever read.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox.errors import SandboxError
from sandbox.privacy.broker import pad_to_quantum
from sandbox.runner.contract import Executor, Exit, SandboxRequest
from sandbox.sdk import protocol

Answer = Callable[[int, dict[str, Any]], dict[str, Any]]
GENERIC = "the query could not be answered on the data; its budget stays charged"
_KINDS = {"table", "text", "figure"}


@dataclass
class ScriptOutcome:
    outputs: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, str]] = field(default_factory=list)
    queries: int = 0
    exit: Exit | None = None
    problem: str | None = None  # why the broker stopped the script, if it did
    answered: list[dict[str, Any]] = field(default_factory=list)  # filled by the caller

    @property
    def reason(self) -> str:
        if self.problem:
            return self.problem
        return self.exit.reason if self.exit else "unknown"


def _reader(stream: Any, out: queue.Queue[dict[str, Any] | BaseException]) -> None:
    try:
        while True:
            out.put(protocol.read(stream))
    except BaseException as exc:  # EOFError at the end, ProtocolError on garbage
        out.put(exc)


def run_script(executor: Executor, request: SandboxRequest, answer: Answer, *,
               quantum_ms: int = 0) -> ScriptOutcome:
    """Run one script to the end (or to a limit); see the module docstring."""
    limits = request.limits
    outcome = ScriptOutcome()
    prepared = executor.prepare(request)
    try:
        running = executor.start(prepared)
        deadline = time.monotonic() + limits.wall_seconds
        frames: queue.Queue[dict[str, Any] | BaseException] = queue.Queue()
        threading.Thread(target=_reader, args=(running.stdout, frames), daemon=True).start()
        output_bytes = log_bytes = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                executor.kill(running, "time limit")
                break
            try:
                message = frames.get(timeout=remaining)
            except queue.Empty:
                executor.kill(running, "time limit")
                break
            if isinstance(message, EOFError):
                break
            if isinstance(message, BaseException):
                outcome.problem = "protocol error: the script wrote to the broker channel"
                executor.kill(running, "protocol error")
                break
            kind = message["type"]
            if kind == "done":
                break
            if kind == "log":
                text = str(message.get("text", ""))
                if log_bytes < limits.output_bytes:
                    text = text[: limits.output_bytes - log_bytes]
                    log_bytes += len(text.encode())
                    outcome.logs.append({"stream": str(message.get("stream")), "text": text})
            elif kind == "emit":
                size = len(json.dumps(message.get("payload")))
                output_bytes += size
                if output_bytes > limits.output_bytes:
                    outcome.problem = f"output cap of {limits.output_bytes} bytes exceeded"
                    executor.kill(running, "output cap")
                    break
                name, out_kind = str(message.get("name", ""))[:100], message.get("kind")
                if out_kind not in _KINDS or not name:
                    outcome.problem = "emit needs a name and a kind of table, text or figure"
                    executor.kill(running, "bad output")
                    break
                outcome.outputs.append({"name": name, "kind": out_kind,
                                        "payload": message.get("payload")})
            elif kind == "query":
                reply = _answer(answer, outcome, limits.queries, message, quantum_ms)
                try:
                    protocol.write(running.stdin, reply)
                except OSError:
                    break
            else:
                outcome.problem = f"unknown message type {kind!r}"
                executor.kill(running, "protocol error")
                break
        with_timeout = max(0.0, deadline - time.monotonic()) + 5
        outcome.exit = executor.wait(running, with_timeout)
    finally:
        executor.cleanup(prepared)
    return outcome


def _answer(answer: Answer, outcome: ScriptOutcome, cap: int, message: dict[str, Any],
            quantum_ms: int) -> dict[str, Any]:
    ident = message.get("id")
    started = time.monotonic()
    if outcome.queries >= cap:
        return {"type": "error", "id": ident,
                "detail": f"this job may send at most {cap} queries (policy)"}
    outcome.queries += 1
    try:
        table = answer(outcome.queries, message.get("spec") or {})
        reply: dict[str, Any] = {"type": "release", "id": ident, "table": table}
    except SandboxError as exc:  # public reasons: schema, policy, budget, the query
        reply = {"type": "error", "id": ident, "detail": str(exc)}
    except Exception:  # data-dependent: one generic reason
        reply = {"type": "error", "id": ident, "detail": GENERIC}
    pad_to_quantum(started, quantum_ms)
    return reply
