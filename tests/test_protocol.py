"""The broker protocol's framing: what the sandbox writes, the broker reads back exactly,
and what the broker refuses (oversized, truncated, non-JSON or unversioned frames)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.sdk import protocol

flat_values = st.one_of(st.none(), st.integers(), st.text())
flat_messages = st.dictionaries(st.text(min_size=1), flat_values, max_size=6)


def _body(frame: bytes) -> bytes:
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    return frame[4:]


@given(flat_messages)
def test_flat_frames_are_the_json_the_broker_reads(message: dict[str, Any]) -> None:
    """The sandbox's json-free encoder (done and log frames) must give exactly what
    ``json.loads`` reads back, for every string: quotes, backslashes, controls, non-ASCII
    and lone surrogates."""
    message = {"type": "log", **message}
    frame = protocol.encode(message)
    assert json.loads(_body(frame)) == {"v": protocol.VERSION, **message}
    assert protocol.read(io.BytesIO(frame)) == {"v": protocol.VERSION, **message}


@pytest.mark.parametrize("text", ['say "hi"\\n', "\x00\x1f\x7f", "\ud800 lone", "城市 ✓"])
def test_awkward_strings_round_trip(text: str) -> None:
    message = {"type": "log", "stream": "stdout", "text": text}
    assert protocol.read(io.BytesIO(protocol.encode(message)))["text"] == text


def test_nested_messages_use_json() -> None:
    message = {"type": "emit", "name": "t", "kind": "table",
               "payload": {"columns": ["a"], "rows": [[1.5, None, True]]}}
    assert protocol.read(io.BytesIO(protocol.encode(message)))["payload"] == \
        message["payload"]


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(ValueError):
        protocol.encode({"type": "emit", "payload": float("nan")})


def test_oversized_frames_are_refused_both_ways() -> None:
    with pytest.raises(protocol.ProtocolError, match="over the"):
        protocol.encode({"type": "log", "text": "x" * protocol.MAX_FRAME})
    header = (protocol.MAX_FRAME + 1).to_bytes(4, "big")
    with pytest.raises(protocol.ProtocolError, match="over the"):
        protocol.read(io.BytesIO(header + b"{}"))


@pytest.mark.parametrize("stream, error", [
    (b"", EOFError),
    (b"\x00\x00", protocol.ProtocolError),  # the stream ends inside the length
    (b"\x00\x00\x00\x10{}", protocol.ProtocolError),  # ... or inside the body
    (b"\x00\x00\x00\x03abc", protocol.ProtocolError),  # not JSON
    (b"\x00\x00\x00\x02[]", protocol.ProtocolError),  # not an object
    (b'\x00\x00\x00\x0f{"type":"done"}', protocol.ProtocolError),  # no version
    (b'\x00\x00\x00\x0e{"v":1,"type":2}', protocol.ProtocolError),  # type not a string
])
def test_malformed_frames_are_refused(stream: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        protocol.read(io.BytesIO(stream))
