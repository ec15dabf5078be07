"""Read-only memory maps of stored (encrypted) files, kept for reuse.

Mapping a file is cheap; touching it is not: every page of a fresh map costs a page-table
update on first access (on the development VM about 17 ms per 145 MB, as much as half of
decrypting it). A worker that evicts a dataset from its plaintext cache and loads it
again would pay that every time, so :class:`MappedFiles` keeps the maps of the files it
opened, least recently used first out, at most ``max_files``.

A map is reused only for the same file in the same state: its identity is the device,
inode, size, modification and change times from a fresh ``os.stat`` of the path at every
open, so a replaced, rewritten or truncated file gets a new map. A map's pages always
show the file's current bytes, so nothing read through it escapes the envelope's checks.
Only ciphertext is ever mapped here. Maps of files that were deleted are dropped at the
next open (they would keep the deleted file's blocks allocated) and by :meth:`clear`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MAPS", "MappedFiles"]

_Identity = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(eq=False)
class _Map:
    fd: int
    mapping: mmap.mmap
    users: int = 0
    retired: bool = False

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a stray view: closed when collected
            self.mapping.close()
        os.close(self.fd)


class MappedFiles:
    """Reusable read-only maps of non-empty files, at most ``max_files`` kept."""

    def __init__(self, max_files: int = 64) -> None:
        self.max_files = max_files
        self._maps: OrderedDict[_Identity, _Map] = OrderedDict()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def open(self, path: Path) -> Iterator[memoryview]:
        """A read-only view of the whole file at ``path`` (which must not be empty), valid
        for the block. ``OSError`` propagates (a missing file)."""
        identity = _identity(os.stat(path))
        with self._lock:
            self._drop_deleted()
            entry = self._maps.get(identity)
            if entry is not None:
                self._maps.move_to_end(identity)
                entry.users += 1
        if entry is None:
            entry = self._map(path)
        view = memoryview(entry.mapping)
        try:
            yield view
        finally:
            with contextlib.suppress(BufferError):
                view.release()
            with self._lock:
                entry.users -= 1
                if entry.retired and entry.users == 0:
                    entry.close()

    def _map(self, path: Path) -> _Map:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            identity = _identity(os.fstat(fd))  # the file actually opened
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except BaseException:
            os.close(fd)
            raise
        entry = _Map(fd, mapping, users=1)
        with self._lock:
            old = self._maps.pop(identity, None)
            if old is not None:  # mapped concurrently by another thread
                self._retire(old)
            self._maps[identity] = entry
            while len(self._maps) > self.max_files:
                self._retire(self._maps.popitem(last=False)[1])
        return entry

    def _retire(self, entry: _Map) -> None:
        entry.retired = True
        if entry.users == 0:
            entry.close()

    def _drop_deleted(self) -> None:
        for identity, entry in list(self._maps.items()):
            try:
                deleted = os.fstat(entry.fd).st_nlink == 0
            except OSError:
                deleted = True
            if deleted:
                del self._maps[identity]
                self._retire(entry)

    def clear(self) -> None:
        """Drop every map (those in use are closed when their block ends)."""
        with self._lock:
            for entry in self._maps.values():
                self._retire(entry)
            self._maps.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)


#: The process's maps of stored files (used by :func:`sandbox.datasets.store.open_envelope`).
MAPS = MappedFiles()
