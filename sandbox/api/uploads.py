"""Streaming multipart uploads into an encrypted disk spool, under size, time and
concurrency limits.

Uploaded datasets are plaintext and may be larger than RAM. Starlette's own form parser
spools large files to the default temp directory (usually persistent disk, in the
clear), so this parser handles ``multipart/form-data`` itself: small form fields stay in
memory (at most :data:`MAX_FIELD_BYTES` each) and every file part is sealed as it arrives
into an :class:`~sandbox.datasets.spool.UploadSpool` on ordinary disk, under a fresh key
held only in this process's memory. The spool is removed when the ``async with`` ends,
whatever happened (success, a refused upload, a disconnect, a cancelled request).

Limits, each answered before anything is stored, and each naming its setting:

* 413: the body is larger than ``max_bytes`` (by ``Content-Length``, or while streaming);
* 408: no body data for ``idle_timeout`` seconds, or, once ``grace`` seconds have
  passed, an average rate since the start below ``min_rate`` bytes/s (a slow-loris
  client cannot hold a connection and a spool for long: an upload of ``n`` bytes must
  finish within ``max(grace, n / min_rate)`` seconds);
* 503 with ``Retry-After``: ``max_concurrent`` uploads are already being received or
  ingested by this process (each may hold a spool of up to ``max_bytes`` on disk and an
  ingest's memory);
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request
from python_multipart.decoders import Base64Decoder, QuotedPrintableDecoder
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from sandbox.config import Settings
from sandbox.datasets.spool import SpoolFile, SpoolWriter, UploadSpool

log = logging.getLogger("sandbox.api.uploads")

MAX_FIELD_BYTES = 1024 * 1024
#: Seconds a client is told to wait when every upload slot is taken.
RETRY_AFTER_SECONDS = 30
#: ``OSError`` numbers that mean "no room": the disk or a quota is full.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_IDENTITY_ENCODINGS = frozenset({b"", b"7bit", b"8bit", b"binary"})


@dataclass(frozen=True)
class UploadLimits:
    """The limits one upload is held to (see the module docstring)."""

    max_bytes: int
    idle_timeout: float = 30.0
    min_rate: float = 64 * 1024.0
    grace: float = 10.0
    max_concurrent: int = 4

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadLimits:
        return cls(max_bytes=settings.max_upload_bytes,
                   idle_timeout=settings.upload_idle_timeout_seconds,
                   min_rate=float(settings.upload_min_bytes_per_second),
                   grace=settings.upload_rate_grace_seconds,
                   max_concurrent=settings.max_concurrent_uploads)


@dataclass
class Upload:
    """A received form: text fields in memory, file parts as encrypted spool files
    (readable through :meth:`SpoolFile.open` or, by path, by ingest), and the file
    names the client gave."""

    fields: dict[str, bytes] = field(default_factory=dict)
    files: dict[str, SpoolFile] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)


class UploadSlots:
    """How many uploads this application is receiving or ingesting (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0

    def try_acquire(self, limit: int) -> bool:
        with self._lock:
            if self.active >= limit:
                return False
            self.active += 1
            return True

    def release(self) -> None:
        with self._lock:
            self.active -= 1


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
async def receive_multipart(request: Request, *, spool_root: Path,
                            limits: UploadLimits) -> AsyncIterator[Upload]:
    """Parse a ``multipart/form-data`` body within ``limits``; file parts are spooled
    encrypted under ``spool_root`` and exist only inside the ``async with``.

    Raises ``HTTPException``: 415 (not multipart), 413, 408, 503, 507 (module
    docstring), 400 (a malformed body, or the client went away). On any of them, and
    whatever the body of the ``async with`` does, the spool is removed and the upload
    slot released.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(415, "expected multipart/form-data")
    declared_text = request.headers.get("content-length", "")
    declared = int(declared_text) if declared_text.isdigit() else None
    if declared is not None and declared > limits.max_bytes:
        raise HTTPException(413, f"upload is larger than the cap of {limits.max_bytes} bytes")
    slots = upload_slots(request)
    if not slots.try_acquire(limits.max_concurrent):
        raise HTTPException(
            503, f"too many uploads in progress (at most {limits.max_concurrent} at once, "
                 "SANDBOX_MAX_CONCURRENT_UPLOADS); retry later",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
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
                parser = _FormParser(spool, params[b"boundary"], upload)
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
        slots.release()


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
    ``idle_timeout`` seconds or, after ``grace`` seconds, averages under ``min_rate``
    bytes/s. Waits are real timeouts: a silent client is cut off on time."""
    loop = asyncio.get_running_loop()
    stream = request.stream()
    start = loop.time()
    received = 0
    try:
        while True:
            # the rate check fails at start + max(grace, received / min_rate)
            rate_deadline = (start + max(limits.grace, received / limits.min_rate)
                             if limits.min_rate > 0 else math.inf)
            rate_wait = rate_deadline - loop.time()
            if rate_wait <= 0:
                raise _too_slow(received, loop.time() - start, limits)
            try:
                chunk = await asyncio.wait_for(stream.__anext__(),
                                               min(limits.idle_timeout, rate_wait))
            except StopAsyncIteration:
                return
            except TimeoutError:
                if rate_wait < limits.idle_timeout:
                    raise _too_slow(received, loop.time() - start, limits) from None
                raise HTTPException(
                    408, f"upload timed out: no data for {limits.idle_timeout:g} seconds "
                         "(SANDBOX_UPLOAD_IDLE_TIMEOUT_SECONDS); nothing was stored",
                    headers={"Connection": "close"}) from None
            received += len(chunk)
            yield chunk
    finally:
        await stream.aclose()


def _too_slow(received: int, elapsed: float, limits: UploadLimits) -> HTTPException:
    return HTTPException(
        408, f"upload too slow: {received} bytes in {elapsed:.1f} seconds, under the minimum "
             f"average rate of {limits.min_rate:g} bytes/s required after the first "
             f"{limits.grace:g} seconds (SANDBOX_UPLOAD_MIN_BYTES_PER_SECOND); nothing was "
             "stored", headers={"Connection": "close"})


class _FormParser:
    """``multipart/form-data`` into an :class:`Upload`: parts with a file name go to the
    spool, the others to memory. Errors: ``HTTPException`` (413, 400) or the parser's
    ``ValueError``; ``OSError`` from the spool."""

    def __init__(self, spool: UploadSpool, boundary: bytes, upload: Upload) -> None:
        self.spool = spool
        self.upload = upload
        self.ended = False
        self._header_name: list[bytes] = []
        self._header_value: list[bytes] = []
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._field: _FieldBuffer | None = None
        self._writer: SpoolWriter | None = None
        self._sink: Any = None  # what part data is written to (maybe through a decoder)
        callbacks: dict[str, Callable[..., None]] = {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value_data, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end}
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def finish(self) -> None:
        self._parser.finalize()
        if not self.ended:
            raise HTTPException(400, "the multipart/form-data body ends before its closing "
                                     "boundary (a truncated upload?); nothing was stored")

    # -- callbacks -----------------------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name.append(data[start:end])

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value.append(data[start:end])

    def _header_end(self) -> None:
        name = b"".join(self._header_name).lower()
        self._headers[name] = b"".join(self._header_value).strip(b" \t")
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        if b"name" not in options:
            raise HTTPException(400, "a multipart part has no Content-Disposition name")
        self._name = options[b"name"].decode(errors="replace")
        filename = options.get(b"filename")
        self._filename = None if filename is None else filename.decode(errors="replace")
        if self._name in self.upload.files or self._name in self.upload.fields:
            raise HTTPException(400, f"form field {self._name!r} is sent more than once")
        target: Any
        if self._filename is None:
            self._field = target = _FieldBuffer(self._name)
        else:
            self._writer = target = self.spool.create()
        encoding = self._headers.get(b"content-transfer-encoding", b"").lower()
        if encoding == b"base64":
            target = Base64Decoder(target)
        elif encoding == b"quoted-printable":
            target = QuotedPrintableDecoder(target)
        elif encoding not in _IDENTITY_ENCODINGS:
            shown = encoding.decode(errors="replace")
            raise HTTPException(400, f"form field {self._name!r}: unsupported "
                                     f"Content-Transfer-Encoding {shown!r}")
        self._sink = target

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._sink.write(memoryview(data)[start:end])

    def _part_end(self) -> None:
        if hasattr(self._sink, "finalize"):
            self._sink.finalize()  # a decoder: flushes its tail into the target
        if self._writer is not None:
            self.upload.files[self._name] = self._writer.finish()
            self.upload.filenames[self._name] = self._filename or ""
            self._writer = None
        elif self._field is not None:
            self.upload.fields[self._name] = bytes(self._field.data)
            self._field = None
        self._sink = None

    def _end(self) -> None:
        self.ended = True


class _FieldBuffer:
    """The in-memory target of a text field part, capped at :data:`MAX_FIELD_BYTES`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data = bytearray()

    def write(self, data: Any) -> int:
        self.data += data
        if len(self.data) > MAX_FIELD_BYTES:
            raise HTTPException(413, f"form field {self.name!r} is larger than "
                                     f"{MAX_FIELD_BYTES} bytes")
        return len(data)

    def finalize(self) -> None:
        """Nothing to flush (decoders call it)."""
