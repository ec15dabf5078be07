"""The broker protocol: framed JSON messages over a pipe, versioned and size-capped.

Frame: 4-byte big-endian length, then that many bytes of UTF-8 JSON, an object with
``"v"`` (protocol version) and ``"type"``. The sandbox writes requests on its stdout and
reads replies on its stdin; it never sees a file, a socket or a row.

Requests (sandbox -> broker):
- ``{"type": "query", "id": n, "spec": {...}}``: a query spec (``sandbox.privacy.spec``);
- ``{"type": "emit", "name": s, "kind": "table"|"text"|"figure", "payload": ...}``;
- ``{"type": "log", "stream": "stdout"|"stderr", "text": s}``: captured prints;
- ``{"type": "done"}``: the script finished.
Replies (broker -> sandbox): ``{"type": "release", "id": n, "table": {...}}`` or
``{"type": "error", "id": n, "detail": s}`` (public reasons only).

It lives in the SDK (which the server may import, never the reverse): no server imports.
"""

from __future__ import annotations

TYPE_CHECKING = False  # ``typing`` and ``json`` load on first use, not at sandbox start
if TYPE_CHECKING:
    from typing import IO, Any

VERSION = 1
MAX_FRAME = 8 * 1024 * 1024
_LEN_SIZE = 4
# JSON string escapes (RFC 8259 section 7): the quote, the backslash and C0 controls
_ESCAPES = {**{c: f"\\u{c:04x}" for c in range(0x20)}, ord('"'): '\\"', ord("\\"): "\\\\"}


class ProtocolError(Exception):
    """A malformed, oversized or unexpected frame: the job fails."""


def _flat(message: dict[str, Any]) -> str | None:
    """JSON for a message whose values are all str, int or None (``done`` and ``log``
    frames), without importing ``json`` (about half of an empty sandbox's start time);
    None for anything else."""
    parts = []
    for key, value in message.items():
        if type(key) is not str:
            return None
        if value is None:
            text = "null"
        elif type(value) is int:
            text = str(value)
        elif type(value) is str:
            text = '"' + value.translate(_ESCAPES) + '"'
        else:
            return None
        parts.append('"' + key.translate(_ESCAPES) + '":' + text)
    return "{" + ",".join(parts) + "}"


def encode(message: dict[str, Any]) -> bytes:
    full = {"v": VERSION, **message}
    text = _flat(full)
    try:
        body = text.encode() if text is not None else b""
    except UnicodeEncodeError:  # a lone surrogate: json escapes it as \\udXXX
        text = None
    if text is None:
        import json

        body = json.dumps(full, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte cap")
    return len(body).to_bytes(_LEN_SIZE, "big") + body


def write(stream: IO[bytes], message: dict[str, Any]) -> None:
    stream.write(encode(message))
    stream.flush()


def _read_exact(stream: IO[bytes], n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read(stream: IO[bytes], max_frame: int = MAX_FRAME) -> dict[str, Any]:
    """The next message; ``EOFError`` at a clean end, ``ProtocolError`` on anything odd."""
    header = stream.read(_LEN_SIZE)
    if not header:
        raise EOFError
    if len(header) < _LEN_SIZE:
        try:
            header += _read_exact(stream, _LEN_SIZE - len(header))
        except EOFError:
            raise ProtocolError("the stream ended inside a frame's length") from None
    length = int.from_bytes(header, "big")
    if length > max_frame:
        raise ProtocolError(f"frame of {length} bytes is over the {max_frame}-byte cap")
    try:
        body = _read_exact(stream, length)
    except EOFError:
        raise ProtocolError("the stream ended inside a frame") from None
    import json

    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("a frame is not valid JSON") from None
    if not isinstance(message, dict) or message.get("v") != VERSION or \
            not isinstance(message.get("type"), str):
        raise ProtocolError(f"a frame is not a version-{VERSION} message")
    return message
