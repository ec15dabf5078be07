"""Streaming multipart uploads into an encrypted disk spool, under size, time and
concurrency limits.

Uploaded datasets are plaintext and may be larger than RAM. Starlette's own form parser
spools large files to the default temp directory (usually persistent disk, in the
clear), so :class:`~sandbox.api.upload_form.FormParser` handles ``multipart/form-data``
itself: only the parts the endpoint declares are accepted (anything else is 400 at its
headers), small text fields stay in memory (capped each and together) and the declared
file part is sealed as it arrives into an :class:`~sandbox.datasets.spool.UploadSpool`
on ordinary disk, under a fresh key held only in this process's memory. The spool is
removed when the ``async with`` ends, whatever happened (success, a refused upload, a
disconnect, a cancelled request), and never while a thread started with
:func:`run_to_end` may still read it.

Limits, each answered before anything is stored, and each naming its setting:

* 413: the body is larger than ``max_bytes`` (by ``Content-Length``, or while streaming);
* 408: no body data for ``idle_timeout`` seconds; or, once ``grace`` seconds have
  passed, an average rate since the start below ``min_rate`` bytes/s (an upload of ``n``
  bytes must finish within ``max(grace, n / min_rate)`` seconds); or the body is not
  complete after ``max_seconds`` whatever its rate (a client cannot hold a slot for
  hours by sending in bursts just often enough);
* 503 with ``Retry-After``: ``max_concurrent`` uploads are already being received or
  ingested by this process (each may hold a spool of up to ``max_bytes`` on disk and an
  ingest's memory), or ``max_concurrent_per_owner`` of them are the same
  organisation's (so one organisation cannot take every slot);
* 507: no space left for the spool (declared length over the free space, or the disk
  filling while writing).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import anyio
from fastapi import HTTPException, Request
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from sandbox.api.upload_form import MAX_FIELD_BYTES, FormParser, FormSpec, Upload
from sandbox.config import Settings
from sandbox.datasets.spool import UploadSpool

__all__ = ["MAX_FIELD_BYTES", "FormSpec", "Upload", "UploadLimits", "UploadSlots",
           "no_space", "receive_multipart", "run_to_end", "upload_slots"]

log = logging.getLogger("sandbox.api.uploads")

#: Seconds a client is told to wait when every upload slot is taken.
RETRY_AFTER_SECONDS = 30
#: ``OSError`` numbers that mean "no room": the disk or a quota is full.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
T = TypeVar("T")


@dataclass(frozen=True)
class UploadLimits:
    """The limits one upload is held to (see the module docstring)."""

    max_bytes: int
    idle_timeout: float = 30.0
    min_rate: float = 64 * 1024.0
    grace: float = 10.0
    max_seconds: float = 7200.0
    max_concurrent: int = 4
    max_concurrent_per_owner: int = 2

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(max_bytes=settings.max_upload_bytes,
                   idle_timeout=settings.upload_idle_timeout_seconds,
                   min_rate=float(settings.upload_min_bytes_per_second),
                   grace=settings.upload_rate_grace_seconds,
                   max_seconds=settings.upload_max_seconds,
                   max_concurrent=settings.max_concurrent_uploads,
                   max_concurrent_per_owner=settings.max_concurrent_uploads_per_org)


class UploadSlots:
    """How many uploads this application is receiving or ingesting, in all and per
    owner (an organisation id); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.by_owner: dict[str, int] = {}

    def try_acquire(self, owner: str, limit: int, per_owner: int
                    ) -> Literal["owner", "total"] | None:
        """Take a slot for ``owner``: ``None`` when taken, else the limit that is full
        (``"owner"``: ``owner`` already has ``per_owner``; ``"total"``: ``limit`` in all).
        """
        with self._lock:
            if self.by_owner.get(owner, 0) >= per_owner:
                return "owner"
            if self.active >= limit:
                return "total"
            self.active += 1
            self.by_owner[owner] = self.by_owner.get(owner, 0) + 1
            return None

    def release(self, owner: str) -> None:
        """Give back a slot taken for ``owner``."""
        with self._lock:
            self.active -= 1
            left = self.by_owner[owner] - 1
            if left:
                self.by_owner[owner] = left
            else:
                del self.by_owner[owner]


_SLOTS_LOCK = threading.Lock()


def upload_slots(request: Request) -> UploadSlots:
    """The application's :class:`UploadSlots` (made on first use)."""
    state = request.app.state
    with _SLOTS_LOCK:
        slots = getattr(state, "upload_slots", None)
        if slots is None:
            slots = state.upload_slots = UploadSlots()
    return slots


def no_space(exc: OSError) -> bool:
    """Whether ``exc`` means the disk (or a quota) is full."""
    return exc.errno in NO_SPACE


@asynccontextmanager
async def receive_multipart(request: Request, *, spool_root: Path, limits: UploadLimits,
                            form: FormSpec, owner: str) -> AsyncIterator[Upload]:
    """Parse a ``multipart/form-data`` body of the parts ``form`` declares, within
    ``limits``, for ``owner`` (the organisation whose slot share it counts against);
    file parts are spooled encrypted under ``spool_root`` and exist only inside the
    ``async with``.

    Raises ``HTTPException``: 415 (not multipart), 413, 408, 503, 507 (module
    docstring), 400 (a malformed body, a part ``form`` does not declare or sent twice, or
    the client went away). On any of them, and whatever the body of the ``async with``
    does, the spool is removed and then the upload slot released, both only once the
    body has finished (see :func:`run_to_end` for threads it starts).
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(415, "expected multipart/form-data")
    declared_text = request.headers.get("content-length", "")
    declared = int(declared_text) if declared_text.isdigit() else None
    if declared is not None and declared > limits.max_bytes:
        raise HTTPException(413, f"upload is larger than the cap of {limits.max_bytes} bytes")
    slots = upload_slots(request)
    full = slots.try_acquire(owner, limits.max_concurrent, limits.max_concurrent_per_owner)
    if full is not None:
        raise _slots_full(full, limits)
    try:
        try:
            spool = UploadSpool(spool_root)
        except OSError as exc:
            raise _spool_error(exc, 0) from None
        with spool:
            _check_room(spool_root, declared)
            upload = Upload()
            received = 0
            try:
                parser = FormParser(spool, params[b"boundary"], upload, form)
                async for chunk in _paced(request, limits):
                    received += len(chunk)
                    if received > limits.max_bytes:
                        raise HTTPException(413, f"upload is larger than the cap of "
                                                 f"{limits.max_bytes} bytes")
                    parser.write(chunk)
                parser.finish()
            except HTTPException:
                raise
            except ClientDisconnect:
                raise HTTPException(400, "the client disconnected before the upload was "
                                         "complete; nothing was stored") from None
            except OSError as exc:  # writing the spool
                raise _spool_error(exc, received) from None
            except Exception:  # the parser's own errors: a malformed body, never a 500
                raise HTTPException(400, "malformed multipart/form-data body") from None
            yield upload
    finally:
        slots.release(owner)


def _slots_full(which: Literal["owner", "total"], limits: UploadLimits) -> HTTPException:
    """503 naming the limit that is reached."""
    if which == "owner":
        detail = (f"too many uploads in progress for your organisation (at most "
                  f"{limits.max_concurrent_per_owner} at once per organisation, "
                  "SANDBOX_MAX_CONCURRENT_UPLOADS_PER_ORG); retry when one of them ends")
    else:
        detail = (f"too many uploads in progress (at most {limits.max_concurrent} at once, "
                  "SANDBOX_MAX_CONCURRENT_UPLOADS); retry later")
    return HTTPException(503, detail, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


async def run_to_end(func: Callable[[threading.Event], T]) -> T:
    """``func(stop)`` in a worker thread; its result or exception.

    If the awaiting task is cancelled (the client went away, a server shutting down),
    ``stop`` is set, so that ``func`` can give up at its next check, and the cancellation
    is held until the thread has ended, then re-raised: a thread never outlives the
    request, so what it reads (an upload spool) and the upload slot are released only
    after it. The wait is shielded from further cancellation (anyio's repeated delivery
    included) and sleeps: it does not spin.
    """
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(func, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with anyio.CancelScope(shield=True):
            while not future.done():
                try:
                    await asyncio.wait({future})
                except asyncio.CancelledError:  # a plain task.cancel() again: still wait
                    continue
        if not future.cancelled():
            future.exception()  # retrieved: not logged as "never retrieved"
        raise


def _check_room(spool_root: Path, declared: int | None) -> None:
    """507 at once when the declared body cannot fit in the spool's free space."""
    if declared is None:
        return
    try:
        free = shutil.disk_usage(spool_root).free
    except OSError:
        return  # the writes will tell
    if declared > free:
        log.warning("upload of %d bytes refused: %d bytes free in the upload spool %s",
                    declared, free, spool_root)
        raise HTTPException(507, f"not enough space on the server to receive an upload of "
                                 f"{declared} bytes; nothing was stored, retry later or ask "
                                 "the administrator to free space in the upload spool")


def _spool_error(exc: OSError, received: int) -> HTTPException:
    """507 for a full disk, else 500; the path goes to the log, not to the client."""
    log.warning("upload spool write failed after %d bytes: %s (%s)", received,
                exc.strerror or exc, exc.filename or "")
    if no_space(exc):
        return HTTPException(507, f"no space left on the server to receive the upload "
                                  f"(after {received} bytes); nothing was stored, retry "
                                  "later or ask the administrator to free space in the "
                                  "upload spool")
    return HTTPException(500, f"cannot write the upload spool: {exc.strerror or 'I/O error'}"
                              "; nothing was stored")


async def _paced(request: Request, limits: UploadLimits) -> AsyncIterator[bytes]:
    """The request body, chunk by chunk, raising 408 when the client stalls for
    ``idle_timeout`` seconds, when after ``grace`` seconds it averages under ``min_rate``
    bytes/s, or when the body is not complete after ``max_seconds``. Waits are real
    timeouts: a silent client is cut off on time."""
    loop = asyncio.get_running_loop()
    stream = request.stream()
    start = loop.time()
    deadline = start + limits.max_seconds
    received = 0
    try:
        while True:
            now = loop.time()
            # the rate check fails at start + max(grace, received / min_rate)
            rate_deadline = (start + max(limits.grace, received / limits.min_rate)
                             if limits.min_rate > 0 else math.inf)
            if now >= deadline:
                raise _too_long(received, limits)
            if now >= rate_deadline:
                raise _too_slow(received, now - start, limits)
            wait = min(limits.idle_timeout, rate_deadline - now, deadline - now)
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), wait)
            except StopAsyncIteration:
                return
            except TimeoutError:  # the limit that set the wait is the one that ran out
                if wait == limits.idle_timeout:
                    raise HTTPException(
                        408, f"upload timed out: no data for {limits.idle_timeout:g} "
                             "seconds (SANDBOX_UPLOAD_IDLE_TIMEOUT_SECONDS); nothing was "
                             "stored", headers={"Connection": "close"}) from None
                if wait == deadline - now:
                    raise _too_long(received, limits) from None
                raise _too_slow(received, loop.time() - start, limits) from None
            received += len(chunk)
            yield chunk
    finally:
        await stream.aclose()


def _too_long(received: int, limits: UploadLimits) -> HTTPException:
    return HTTPException(
        408, f"upload took too long: {received} bytes received, not complete after "
             f"{limits.max_seconds:g} seconds, the longest an upload may take "
             "(SANDBOX_UPLOAD_MAX_SECONDS); nothing was stored; on a slow link, upload a "
             "smaller or compressed (Parquet) file", headers={"Connection": "close"})


def _too_slow(received: int, elapsed: float, limits: UploadLimits) -> HTTPException:
    return HTTPException(
        408, f"upload too slow: {received} bytes in {elapsed:.1f} seconds, under the minimum "
             f"average rate of {limits.min_rate:g} bytes/s required after the first "
             f"{limits.grace:g} seconds (SANDBOX_UPLOAD_MIN_BYTES_PER_SECOND); nothing was "
             "stored", headers={"Connection": "close"})
