"""Broker-side helpers shared by query jobs and (later) script jobs' broker sessions."""

from __future__ import annotations

import math
import time


def pad_to_quantum(started: float, quantum_ms: int) -> None:
    """Sleep until the time since ``started`` (``time.monotonic``) is a whole number of
    quanta, so how long an answer took says nothing finer than the policy's quantum
    (attack catalogue 27). A quantum of 0 disables padding."""
    if quantum_ms <= 0:
        return
    quantum = quantum_ms / 1000
    elapsed = time.monotonic() - started
    target = max(1, math.ceil(elapsed / quantum)) * quantum
    if target > elapsed:
        time.sleep(target - elapsed)
