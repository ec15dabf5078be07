"""The worker's byte-capped cache of decrypted datasets, and their per-job RAM files.

Decrypted datasets stay in this process's memory only (an LRU of buffers keyed by
dataset, version and ciphertext hash, evicted by size and zeroed when dropped). For a
query, ``materialise`` writes the buffer to a 0600 file in a private 0700 directory on a
RAM-backed filesystem, because OpenDP's Polars scans a file path lazily (an in-memory
frame costs it seconds); the file is removed when the job's block ends, so between jobs
no plaintext exists outside the worker's memory. ``reap_orphans`` removes such
directories left by a worker that was killed (their name carries its pid).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

_PREFIX = "sbx-plain-"


class DecryptedCache:
    """LRU of decrypted buffers, at most ``max_bytes`` in total."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, str], bytearray] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int, str], load: Callable[[], bytearray]) -> bytearray:
        """The buffer for ``key``, calling ``load`` (decrypt) on a miss."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
        buffer = load()
        self.misses += 1
        with self._lock:
            if len(buffer) <= self.max_bytes:
                self._items[key] = buffer
                self._size += len(buffer)
                self._evict()
        return buffer

    def _evict(self) -> None:
        while self._size > self.max_bytes and self._items:
            _key, buffer = self._items.popitem(last=False)
            self._size -= len(buffer)
            wipe(buffer)

    def clear(self) -> None:
        with self._lock:
            for buffer in self._items.values():
                wipe(buffer)
            self._items.clear()
            self._size = 0

    @property
    def size(self) -> int:
        return self._size


def wipe(buffer: bytearray) -> None:
    """Overwrite a plaintext buffer in place before it is released."""
    if buffer:
        memoryview(buffer)[:] = bytes(len(buffer))


@contextlib.contextmanager
def materialise(buffer: bytearray, tmpfs_dir: Path, suffix: str = ".parquet") -> Iterator[Path]:
    """A 0600 file holding ``buffer`` in a 0700 directory on tmpfs, removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=tmpfs_dir))
    path = directory / f"data{suffix}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer)
        yield path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def reap_orphans(tmpfs_dir: Path) -> int:
    """Remove plaintext directories whose worker process no longer exists."""
    removed = 0
    if not tmpfs_dir.is_dir():
        return 0
    for entry in tmpfs_dir.iterdir():
        if not entry.name.startswith(_PREFIX):
            continue
        pid_text = entry.name[len(_PREFIX):].split("-", 1)[0]
        if pid_text.isdigit() and _alive(int(pid_text)):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed += 1
    return removed


def reap_stale_uploads(tmpfs_dir: Path, older_than: float = 3600.0) -> int:
    """Remove upload spool directories left by a crashed API (plaintext in RAM)."""
    import time
    removed = 0
    if not tmpfs_dir.is_dir():
        return 0
    for entry in tmpfs_dir.iterdir():
        if entry.name.startswith("sbx-upload-"):
            try:
                if time.time() - entry.stat().st_mtime > older_than:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                continue
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


RAM_FILESYSTEMS = frozenset({"tmpfs", "ramfs"})


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` lives on (from /proc/self/mounts)."""
    target = str(path.resolve())
    best, fstype = "", "unknown"
    try:
        with open("/proc/self/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                point = fields[1].replace("\\040", " ")
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, fields[2]
    except OSError:
        return "unknown"
    return fstype


def check_ram_filesystem(path: Path) -> None:
    """Refuse a plaintext directory that is not RAM-backed (fail closed)."""
    fstype = filesystem_type(path)
    if fstype not in RAM_FILESYSTEMS:
        from sandbox.errors import Conflict
        raise Conflict(f"SANDBOX_TMPFS_DIR {str(path)!r} is on a {fstype} filesystem, not "
                       "tmpfs/ramfs: decrypted data must never reach persistent disk")
