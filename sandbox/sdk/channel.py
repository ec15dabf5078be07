"""The SDK's end of the broker channel (inside the sandbox).

The bootstrap (``sandbox.sdk.bootstrap``) calls ``connect`` with the process's
original stdin/stdout before the analyst's script runs; prints are captured and sent as
``log`` messages, so the channel carries only frames.
"""

from __future__ import annotations

from sandbox.sdk import protocol

TYPE_CHECKING = False  # no ``typing`` at run time: it is most of the sandbox's start cost
if TYPE_CHECKING:
    from typing import Any, BinaryIO


class BrokerError(Exception):
    """The broker refused a query; the message is its public reason."""


_state: dict[str, Any] = {"in": None, "out": None, "seq": 0}


def connect(reader: BinaryIO, writer: BinaryIO) -> None:
    _state.update({"in": reader, "out": writer, "seq": 0})


def _out() -> BinaryIO:
    if _state["out"] is None:
        raise RuntimeError("not connected to a broker: run the script with 'sandbox run' or "
                           "submit it as a job")
    out: BinaryIO = _state["out"]
    return out


def send(message: dict[str, Any]) -> None:
    protocol.write(_out(), message)


def query(spec: dict[str, Any]) -> dict[str, Any]:
    _state["seq"] += 1
    ident = _state["seq"]
    send({"type": "query", "id": ident, "spec": spec})
    reply = protocol.read(_state["in"])
    if reply.get("id") != ident:
        raise BrokerError("the broker answered out of order")
    if reply["type"] == "error":
        raise BrokerError(str(reply.get("detail")))
    table: dict[str, Any] = reply["table"]
    return table


def emit(name: str, kind: str, payload: Any) -> None:
    send({"type": "emit", "name": name, "kind": kind, "payload": payload})
