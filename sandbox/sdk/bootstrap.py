"""The first code that runs inside the sandbox: wire the channel, run the script.

``python -I -S -m sandbox.sdk.bootstrap /job/script.py`` (isolated mode: no environment
variables, no user site). The original stdin/stdout become the broker channel; fd 1 is
then pointed at /dev/null so nothing but frames can reach the broker, and ``print``
output is captured and sent as ``log`` messages (capped). Whatever the script does, the
exit status and the ``done`` message tell the broker how it ended.
"""

from __future__ import annotations

import io
import os
import sys

from sandbox.sdk import channel, protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

# Only modules Python has already loaded at start-up are imported here (io, os, sys):
# the start of every sandbox pays for each import, and ``runpy``/``traceback``/``typing``
# cost more than the namespaces and the interpreter together.

LOG_CAP = 1024 * 1024


class _Log(io.TextIOBase):
    """A text stream that forwards whole lines as ``log`` frames, up to ``LOG_CAP``
    characters in all; the rest is dropped (and the broker caps again)."""

    sent = 0

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending or len(self.pending) > 4096:
            self.flush()
        return len(text)

    def flush(self) -> None:
        text, self.pending = self.pending, ""
        if text and _Log.sent < LOG_CAP:
            chunk = text[: LOG_CAP - _Log.sent]
            _Log.sent += len(chunk)
            channel.send({"type": "log", "stream": self.stream, "text": chunk})


def _run(script: str) -> None:
    """Run the script as ``__main__`` (what ``runpy.run_path`` does for a plain file)."""
    with open(script, "rb") as handle:
        code = compile(handle.read(), script, "exec")
    module = type(sys)("__main__")
    module.__file__ = script
    sys.modules["__main__"] = module
    sys.argv[:] = [script]
    exec(code, module.__dict__)


def main() -> NoReturn:
    """Run the script, send ``done``, and end the process at once: nothing of the
    script (atexit handlers, threads, finalisers) runs after ``done``, and the
    interpreter's teardown is skipped (the sandbox is discarded whole)."""
    script = sys.argv[1]
    reader = os.fdopen(os.dup(0), "rb", buffering=0)
    writer = os.fdopen(os.dup(1), "wb", buffering=0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    channel.connect(reader, writer)
    sys.stdout = _Log("stdout")
    sys.stderr = _Log("stderr")
    status = 0
    try:
        _run(script)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        sys.stderr.write(traceback.format_exc())
        status = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        protocol.write(writer, {"type": "done", "status": status})
    except OSError:
        pass
    os._exit(status if 0 <= status <= 255 else 1)


if __name__ == "__main__":
    main()
