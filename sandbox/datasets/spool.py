"""Encrypted upload spool: uploaded files on ordinary disk, readable only by this process.

An upload is the owner's plaintext. It must never reach persistent disk in the clear, and
it may be larger than RAM, so it cannot be held in memory or on tmpfs either. Each upload
(:class:`UploadSpool`) therefore gets a fresh random AES-256-GCM key that exists only in
this process's memory (never written, logged, or put in a message), and each uploaded
file is sealed as it arrives by the envelope's chunked STREAM writer
(:class:`~sandbox.datasets.envelope.EncryptingSink`) into a 0600 file inside a 0700
directory ``sbx-upload-<pid>-<random>`` under the spool root.

A spool file is ``SPOOL_MAGIC | header_len (uint32) | header`` (JSON: ``kind``,
``chunk_size``, a random ``file_id``), then records ``nonce | ciphertext | tag``, one per
``chunk_size`` plaintext bytes and a final record of 0..``chunk_size`` bytes; record ``i``
is sealed with the associated data :func:`~sandbox.datasets.envelope.aad` over the
SHA-256 of that prefix, ``i`` and a final flag. The reader trusts nothing on disk: the
prefix, the plaintext length and so the chunk count come from memory, so a changed
header, a flipped bit, reordered, swapped, truncated or extended data all fail with
:class:`SpoolIntegrityError`, naming the chunk.

:meth:`SpoolFile.open` gives a read-only, seekable file object that decrypts one chunk at
a time (random access: Parquet reads its footer first), authenticating every chunk it
reads. Ingest finds it by path, through :func:`open_plaintext`, while the spool is open.

Closing a spool removes its directory, whatever happened, and forgets the key; its files
stop being found by :func:`open_plaintext` at the same instant the spool is marked closed
(one lock), so a reader either gets the key of an open spool or is told the path is not
a spool file. An open spool's directory is ``flock``-ed by its process; after a crash the
kernel has dropped the lock and the key is gone with the process, so a stale spool is
ciphertext nobody can read: :func:`reap_stale_uploads` removes
unlocked spools to free the disk. A directory is made as ``.sbx-upload-tmp-<pid>-<random>``
and renamed to its ``sbx-upload-`` name only once locked, so another process's reaper
never finds a live spool unlocked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandbox.datasets.envelope import LEN, NONCE, TAG, EncryptingSink, IntegrityError, aad

__all__ = [
    "SPOOL_CHUNK_SIZE",
    "SPOOL_MAGIC",
    "SPOOL_PREFIX",
    "SPOOL_STAGING_PREFIX",
    "SpoolFile",
    "SpoolIntegrityError",
    "SpoolWriter",
    "UploadSpool",
    "open_plaintext",
    "reap_stale_uploads",
]

SPOOL_MAGIC = b"SBXSPL1\n"
#: Name prefix of a spool directory; the full name is ``sbx-upload-<pid>-<random>``.
SPOOL_PREFIX = "sbx-upload-"
#: Name prefix of a spool directory being made (not yet locked): the reaper removes
#: these only when unlocked and old.
SPOOL_STAGING_PREFIX = ".sbx-upload-tmp-"
#: Plaintext bytes per record. Small enough that a random read (the Parquet footer, a
#: column chunk) decrypts little it does not need, large enough that the per-record cost
#: (nonce, AEAD call, 28 bytes) is noise: ~0.3 ms of AES-GCM per chunk.
SPOOL_CHUNK_SIZE = 1024 * 1024
_OPEN_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)

#: Spool files of open spools, by absolute path: how ingest finds the key for a path.
_LIVE: dict[str, SpoolFile] = {}
_LIVE_LOCK = threading.Lock()


class SpoolIntegrityError(IntegrityError):
    """A spool file is not what this process wrote (changed on disk): the message names
    the file and the chunk, never plaintext or the key."""


def open_plaintext(path: Path) -> BinaryIO | None:
    """A decrypting reader of ``path`` if it is a file of an open spool of this process
    (see :meth:`SpoolFile.open`), else ``None``: then ``path`` is an ordinary file.

    Never the closed spool's ``ValueError``: the lookup and the key are had atomically
    with :meth:`UploadSpool.close`. (``OSError`` if the file is gone meanwhile.)"""
    with _LIVE_LOCK:  # atomic with close(): an open spool's key, or no entry at all
        spooled = _LIVE.get(os.path.abspath(path))
        if spooled is None:
            return None
        key = spooled._spool.key()
    return cast(BinaryIO, SpoolReader(spooled, key))


class UploadSpool:
    """One upload's spool: a fresh 0700 directory under ``root`` and a fresh key.

    Use it as a context manager (or call :meth:`close`): closing aborts files still
    being written, removes the directory with every file in it, and forgets the key, on
    success and failure alike. ``root`` is created 0700 if missing. Writing is not
    thread-safe; reading files (:meth:`SpoolFile.open`) is, each reader being separate.
    """

    def __init__(self, root: Path, *, chunk_size: int = SPOOL_CHUNK_SIZE) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Made under a name the reaper leaves alone, locked, and only then renamed into
        # place: a reaper (of another process starting on the same root) never sees an
        # unlocked live spool. The lock is on the directory itself, so it moves with it.
        staging = Path(tempfile.mkdtemp(prefix=f"{SPOOL_STAGING_PREFIX}{os.getpid()}-",
                                        dir=root))  # mode 0700
        self.directory = staging
        lock = -1
        try:  # held while the spool is open; the kernel drops it when this process dies
            lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            final = root / (SPOOL_PREFIX + staging.name.removeprefix(SPOOL_STAGING_PREFIX))
            if os.path.lexists(final):  # rename would replace an empty directory
                raise FileExistsError(errno.EEXIST, "upload spool name taken", str(final))
            os.rename(staging, final)
            self.directory = final
        except BaseException:
            if lock >= 0:
                os.close(lock)
            shutil.rmtree(self.directory, ignore_errors=True)
            raise
        self._lock = lock
        self.chunk_size = chunk_size
        self._key = bytearray(secrets.token_bytes(32))
        self._writers: list[SpoolWriter] = []
        self._files: list[SpoolFile] = []
        self._serial = 0
        self.closed = False

    def __repr__(self) -> str:  # never the key
        return f"UploadSpool({str(self.directory)!r})"

    def __enter__(self) -> UploadSpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> SpoolWriter:
        """A new, empty spool file (0600) to write one uploaded file into."""
        if self.closed:
            raise ValueError("the upload spool is closed")
        self._serial += 1
        writer = SpoolWriter(self, self.directory / f"part-{self._serial}")
        self._writers.append(writer)
        return writer

    def key(self) -> bytes:
        if self.closed:
            raise ValueError("the upload spool is closed (its key is gone)")
        return bytes(self._key)

    def _finished(self, writer: SpoolWriter, file: SpoolFile) -> None:
        self._writers.remove(writer)
        self._files.append(file)
        file.register()

    def close(self) -> None:
        """Abort unfinished files, remove the directory and forget the key (idempotent)."""
        with _LIVE_LOCK:  # atomic with open_plaintext: registered means open
            if self.closed:
                return
            self.closed = True
            for file in self._files:
                file.unregister(locked=True)
        for writer in list(self._writers):
            writer.abort()
        shutil.rmtree(self.directory, ignore_errors=True)
        os.close(self._lock)
        self._key[:] = bytes(len(self._key))


class SpoolWriter:
    """Seals bytes written to it into one spool file, ``chunk_size`` bytes per record.

    ``write`` raises ``OSError`` as the disk does (``ENOSPC`` when it is full); then
    call :meth:`abort` (closing the spool does). :meth:`finish` seals the final record
    and returns the readable :class:`SpoolFile`.
    """

    def __init__(self, spool: UploadSpool, path: Path) -> None:
        self._spool = spool
        self.path = path
        header = {"kind": "upload-spool", "chunk_size": spool.chunk_size,
                  "file_id": secrets.token_hex(16)}
        body = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        self._prefix = SPOOL_MAGIC + LEN.pack(len(body)) + body
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS, 0o600)
        self._out = open(fd, "wb")  # noqa: SIM115 - closed by finish or abort
        try:
            # no checksum: a spool keeps none, and SHA-256 took 2/3 of the writing time
            self._sink = EncryptingSink(self._out, self._prefix, spool.key(), spool.chunk_size,
                                        checksum=False)
        except BaseException:
            self._out.close()
            raise
        self.done = False

    @property
    def size(self) -> int:
        """Plaintext bytes written so far."""
        return self._sink.position

    def write(self, data: Any) -> int:
        """Seal and append ``data`` (any bytes-like object); returns its length."""
        return self._sink.write(data)

    def finish(self) -> SpoolFile:
        """Seal the final record, close the file, and return it for reading."""
        self._sink.finish()
        self._out.close()  # flushes: a full disk raises here as well
        self.done = True
        file = SpoolFile(self._spool, self.path, self._sink.position, self._prefix)
        self._spool._finished(self, file)
        return file

    def abort(self) -> None:
        """Zero the staging buffer, close and delete the partial file."""
        self._sink.aborted = True
        self._sink.wipe()
        with contextlib.suppress(OSError):  # a full disk: the tail goes with the file
            self._out.close()
        self.path.unlink(missing_ok=True)
        if self in self._spool._writers:
            self._spool._writers.remove(self)


class SpoolFile:
    """A finished spool file: ``size`` plaintext bytes at ``path``, readable with
    :meth:`open` while its spool is open."""

    def __init__(self, spool: UploadSpool, path: Path, size: int, prefix: bytes) -> None:
        self._spool = spool
        self.path = path
        self.size = size
        self.chunk_size = spool.chunk_size
        self.prefix = prefix
        self.digest = hashlib.sha256(prefix).digest()

    def __repr__(self) -> str:
        return f"SpoolFile({str(self.path)!r}, size={self.size})"

    def open(self) -> BinaryIO:
        """A new read-only, seekable reader of the plaintext (see :class:`SpoolReader`)."""
        return cast(BinaryIO, SpoolReader(self, self._spool.key()))

    def with_suffix(self, suffix: str) -> Path:
        """Rename the file on disk to end in ``suffix`` (ingest picks the format by
        suffix) and return the new path, by which :func:`open_plaintext` finds it."""
        target = self.path.with_suffix(suffix)
        self.unregister()
        os.rename(self.path, target)
        self.path = target
        self.register()
        return target

    def register(self) -> None:
        """Make :func:`open_plaintext` find this file by its path."""
        with _LIVE_LOCK:
            _LIVE[os.path.abspath(self.path)] = self

    def unregister(self, *, locked: bool = False) -> None:
        """Forget this file's path (``locked``: the caller holds the registry lock)."""
        with contextlib.nullcontext() if locked else _LIVE_LOCK:
            if _LIVE.get(os.path.abspath(self.path)) is self:
                del _LIVE[os.path.abspath(self.path)]


class SpoolReader(io.RawIOBase):
    """Read-only, seekable file object over a spool file's plaintext.

    ``readinto`` fills the buffer completely unless the end is reached, decrypting and
    authenticating each record it needs (straight into the caller's buffer when a whole
    record fits, otherwise through one cached record, so small sequential reads decrypt
    each record once). A record that fails authentication, a short file or a changed
    prefix raises :class:`SpoolIntegrityError`. Closing zeroes the cached plaintext.
    """

    def __init__(self, file: SpoolFile, key: bytes) -> None:
        super().__init__()
        self.name = str(file.path)
        self._what = f"upload spool file {file.path.name!r}"
        self._size = file.size
        self._chunk = file.chunk_size
        self._count = file.size // self._chunk + 1  # full records, then a final one
        self._digest = file.digest
        self._prefix_len = len(file.prefix)
        self._aead = AESGCM(key)
        self._pos = 0
        self._lock = threading.Lock()
        self._cache = bytearray(self._chunk)
        self._cached = -1
        self._record = bytearray(NONCE + self._chunk + TAG)
        self._fd = os.open(file.path, os.O_RDONLY | _OPEN_FLAGS)
        try:
            st = os.fstat(self._fd)
            expected = self._prefix_len + self._count * (NONCE + TAG) + self._size
            if not stat.S_ISREG(st.st_mode) or st.st_size != expected:
                raise self._fail(f"it is {st.st_size} bytes, not the {expected} written")
            if os.pread(self._fd, self._prefix_len, 0) != file.prefix:
                raise self._fail("its header changed")
        except BaseException:
            os.close(self._fd)
            raise

    def _fail(self, reason: str) -> SpoolIntegrityError:
        return SpoolIntegrityError(f"{self._what} failed the integrity check: {reason} "
                                   "(modified on disk since it was written)")

    # -- file-object protocol ----------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"I/O operation on a closed {self._what}")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}.get(whence)
        if base is None:
            raise ValueError(f"invalid whence {whence!r}")
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        done = 0
        with self._lock:
            while done < len(view) and self._pos < self._size:
                index, offset = divmod(self._pos, self._chunk)
                length = self._plain_len(index)
                take = min(length - offset, len(view) - done)
                if offset == 0 and take == length and index != self._cached:
                    self._decrypt(index, view[done:done + length])
                else:
                    if index != self._cached:
                        self._cached = -1
                        self._decrypt(index, memoryview(self._cache)[:length])
                        self._cached = index
                    view[done:done + take] = memoryview(self._cache)[offset:offset + take]
                done += take
                self._pos += take
        return done

    def close(self) -> None:
        if not self.closed:
            self._cache[:] = bytes(len(self._cache))
            self._cached = -1
            os.close(self._fd)
        super().close()

    # -- records -------------------------------------------------------------------------

    def _plain_len(self, index: int) -> int:
        return self._chunk if index < self._count - 1 else self._size % self._chunk

    def _decrypt(self, index: int, out: memoryview) -> None:
        """Authenticate record ``index`` and decrypt it into ``out`` (its exact length)."""
        n = len(out)
        record = memoryview(self._record)[:NONCE + n + TAG]
        start = self._prefix_len + index * (NONCE + self._chunk + TAG)
        if os.preadv(self._fd, [record], start) != len(record):
            raise self._fail(f"it is truncated in chunk {index} of {self._count}")
        try:
            self._aead.decrypt_into(bytes(record[:NONCE]), record[NONCE:],
                                    aad(self._digest, index, index == self._count - 1), out)
        except InvalidTag:
            out[:] = bytes(n)
            raise self._fail(f"chunk {index} of {self._count} failed authentication") \
                from None


def reap_stale_uploads(directory: Path, older_than: float = 3600.0) -> int:
    """Remove upload spool directories (``sbx-upload-*``) in ``directory`` that no live
    upload owns; returns how many.

    An encrypted spool (:mod:`sandbox.datasets.spool`, ``sbx-upload-<pid>-<random>``) is
    locked (``flock``) by its process while open, and the kernel drops the lock when the
    process dies however it dies; an unlocked one is removed: its key died with the
    process, so its files are ciphertext nobody can read and only take disk space. (The
    pid in the name is for people: a restarted container may reuse it.) The reaper takes
    that lock itself and holds it until the directory is removed, after checking that the
    name still is the directory it locked, so a spool cannot come to life under it.

    A spool is made as ``.sbx-upload-tmp-<pid>-<random>`` and locked before it gets its
    ``sbx-upload-`` name, so a live spool is never seen unlocked; such a staging directory
    is removed only when untouched for ``older_than`` seconds and unlocked (a crash
    between making and renaming it). Directories without a pid (the plaintext tmpfs
    spools of earlier versions) are removed when untouched for ``older_than`` seconds.
    """
    removed = 0
    if not directory.is_dir():
        return 0
    for entry in directory.iterdir():
        name = entry.name
        if name.startswith(SPOOL_STAGING_PREFIX):
            removed += _reap_unlocked(entry, older_than)
        elif name.startswith(SPOOL_PREFIX):
            pid, dash, _ = name.removeprefix(SPOOL_PREFIX).partition("-")
            if dash and pid.isdigit():
                removed += _reap_unlocked(entry, None)
                continue
            try:
                stale = time.time() - entry.lstat().st_mtime > older_than
            except OSError:
                continue
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def _reap_unlocked(entry: Path, older_than: float | None) -> bool:
    """Remove the spool directory ``entry`` if no process holds its lock (and, with
    ``older_than``, it is untouched for that many seconds); the lock is taken and held
    through the removal. Whether it was removed."""
    try:
        if older_than is not None and time.time() - entry.lstat().st_mtime <= older_than:
            return False  # perhaps being made right now: not locked yet
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # gone meanwhile, not a directory, a symlink
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live upload's spool
        locked, named = os.fstat(fd), os.lstat(entry)
        if (locked.st_dev, locked.st_ino) != (named.st_dev, named.st_ino):
            return False  # the name is another directory now
        shutil.rmtree(entry, ignore_errors=True)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # releases the lock, after the removal
