"""The worker's byte-capped cache of decrypted datasets, held in RAM buffers.

Decrypted datasets exist in this process's memory only: each in a
:class:`~sandbox.datasets.plaintext.PlainBuffer` (an anonymous memfd, no file name),
which the privacy engine scans in place. :class:`DecryptedCache` keeps them in an LRU
keyed by dataset, version and ciphertext hash, at most ``max_bytes`` of buffers in all.
A job holds its dataset through :meth:`DecryptedCache.use`, which pins the buffer so that
no other job's load can evict it mid-scan.

Evicted buffers are wiped (zeroed) at once and their memory is kept, wiped, for the next
load that fits in it: touching fresh memory costs page faults (expensive on virtual
machines), reusing it does not. Kept memory counts towards ``max_bytes`` as well; it is
released when a load needs the room. One exception to "wiped at once": a buffer evicted
to make room for a load that promises to overwrite every byte it is given
(``allocate(size, overwrite=True)``, as :func:`envelope_loader` does) goes to that load
unwiped, because zeroing 145 MB only for the decryption to overwrite it costs as much as
the decryption itself; the bytes beyond the new dataset's length are zeroed, and if the
load fails the cache wipes the buffer. ``reap_orphans`` removes per-job plaintext
directories that older versions of the worker left on tmpfs (their name carries the pid).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sandbox.datasets import store
from sandbox.datasets.plaintext import PlainBuffer

_PREFIX = "sbx-plain-"

Key = tuple[str, int, str]


class Allocate(Protocol):
    """``allocate(size)``: a wiped buffer of exactly ``size`` bytes, owned by the cache.

    ``allocate(size, overwrite=True)``: the caller promises to overwrite all ``size``
    bytes before it returns the buffer (or to raise); the buffer may then still hold a
    dataset evicted for this load (never one in use), which saves wiping it first.
    """

    def __call__(self, size: int, *, overwrite: bool = False) -> PlainBuffer: ...


@dataclass(eq=False)
class _Entry:
    buffer: PlainBuffer
    pins: int = 0
    cached: bool = True


class DecryptedCache:
    """LRU of decrypted datasets in RAM buffers, at most ``max_bytes`` in total.

    Contract: every buffer the cache hands out holds plaintext that ``load`` put there
    (so authenticated, if ``load`` authenticates); a buffer is wiped before its memory
    serves another dataset, when it is evicted, when a load fails and on :meth:`clear`,
    except that an overwriting load (see :class:`Allocate`) may be given the evicted
    memory unwiped, to overwrite; it is never handed out before that load returns.
    Buffers in use are never evicted; a dataset larger than the room left beside them is
    still served, for that job only, and wiped when the job releases it.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Key, _Entry] = OrderedDict()
        self._spare: list[PlainBuffer] = []  # wiped, kept for reuse
        self._loose: set[_Entry] = set()  # pinned but no longer (or never) cached
        self._loading: list[PlainBuffer] = []  # given to a load not yet finished
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @contextlib.contextmanager
    def use(self, key: Key, load: Callable[[Allocate], PlainBuffer]) -> Iterator[PlainBuffer]:
        """The buffer for ``key``, pinned for the block; on a miss ``load(allocate)``
        fills one (decrypts) and returns it. If ``load`` raises, every buffer it
        allocated is wiped and the exception propagates."""
        with self._lock:
            entry = self._items.get(key)
            if entry is not None:
                self._items.move_to_end(key)
                entry.pins += 1
                self.hits += 1
        if entry is None:
            entry = self._load(key, load)
        try:
            yield entry.buffer
        finally:
            with self._lock:
                entry.pins -= 1
                if not entry.cached and entry.pins == 0:
                    self._loose.discard(entry)
                    self._retire(entry.buffer)

    def _load(self, key: Key, load: Callable[[Allocate], PlainBuffer]) -> _Entry:
        given: list[PlainBuffer] = []

        def allocate(size: int, *, overwrite: bool = False) -> PlainBuffer:
            with self._lock:
                buffer = self._allocate(size, overwrite)
                self._loading.append(buffer)
            given.append(buffer)
            return buffer

        def finished() -> None:  # callers hold the lock
            for b in given:
                self._loading.remove(b)

        try:
            buffer = load(allocate)
            if not any(buffer is b for b in given):
                raise ValueError("load must return a buffer it allocated")
        except BaseException:
            with self._lock:
                finished()
                for b in given:
                    self._retire(b)
            raise
        with self._lock:
            finished()
            self.misses += 1
            for b in given:
                if b is not buffer:
                    self._retire(b)
            entry = _Entry(buffer, pins=1)
            if key not in self._items and self._fits(buffer.size):
                self._items[key] = entry
            else:  # too large for the cache, or loaded twice concurrently: this job only
                entry.cached = False
                self._loose.add(entry)
        return entry

    # -- bookkeeping (callers hold the lock) ---------------------------------------------

    def _live_bytes(self) -> int:
        return (sum(e.buffer.size for e in self._items.values())
                + sum(e.buffer.size for e in self._loose)
                + sum(b.size for b in self._loading))

    def _fits(self, size: int) -> bool:
        return self._live_bytes() + sum(b.size for b in self._spare) + size <= self.max_bytes

    def _allocate(self, size: int, overwrite: bool) -> PlainBuffer:
        """A buffer of ``size`` bytes: reused spare memory when some fits, after evicting
        unpinned datasets (LRU first) to make room; else a new buffer, after releasing
        spare memory beyond the cap. Wiped, unless ``overwrite`` and it is the memory of
        the dataset just evicted (its bytes beyond ``size`` are zeroed all the same)."""
        while True:
            fit = [b for b in self._spare if b.size >= size]
            if fit:
                buffer = min(fit, key=lambda b: b.size)
                self._spare.remove(buffer)
                buffer.shrink(size)
                return buffer
            if self._live_bytes() + size <= self.max_bytes:
                break
            evicted = self._evict_one()
            if evicted is None:
                break
            if overwrite and evicted.size >= size:
                evicted.shrink(size)
                return evicted
            self._retire(evicted)
        while self._spare and self._live_bytes() + sum(b.size for b in self._spare) \
                + size > self.max_bytes:
            self._spare.pop(0).close()
        return PlainBuffer(size)

    def _evict_one(self) -> PlainBuffer | None:
        """Drop the least recently used unpinned dataset from the cache and return its
        buffer, not yet wiped (the caller retires it or hands it to an overwriting
        load); ``None`` if every dataset is in use."""
        for key, entry in self._items.items():
            if entry.pins == 0:
                del self._items[key]
                return entry.buffer
        return None

    def _retire(self, buffer: PlainBuffer) -> None:
        """Wipe a buffer; keep its memory as spare if that fits under the cap."""
        buffer.wipe()
        if self._live_bytes() + sum(b.size for b in self._spare) + buffer.size \
                <= self.max_bytes:
            self._spare.append(buffer)
        else:
            buffer.close()

    def reserve(self, size: int) -> bool:
        """Fault in ``size`` bytes of zeroed memory now and keep it as spare, so that the
        first load that fits in it touches no fresh memory (on a virtual machine that
        costs more than the decryption). For a worker's start, before jobs arrive.
        ``False`` (nothing reserved) when that would go over ``max_bytes``.

        The memory is filled holding the cache's lock (about 0.1 s per GB here), so a
        job that arrives meanwhile waits for it and then gets it, instead of faulting in
        memory of its own beside it and going over the cap."""
        if size <= 0:
            return False
        with self._lock:
            if not self._fits(size):
                return False
            buffer = PlainBuffer(size)
            try:
                buffer.wipe()  # writes every page: faults them all in
            except BaseException:
                buffer.close()
                raise
            self._spare.append(buffer)
        return True

    def clear(self) -> None:
        """Wipe and release every buffer not in use; buffers in use are wiped and
        released when their job ends."""
        with self._lock:
            for entry in list(self._items.values()):
                if entry.pins:
                    entry.cached = False
                    self._loose.add(entry)
                else:
                    entry.buffer.close()
            self._items.clear()
            for buffer in self._spare:
                buffer.close()
            self._spare.clear()

    @property
    def size(self) -> int:
        """Bytes of decrypted datasets held in the cache."""
        with self._lock:
            return sum(e.buffer.size for e in self._items.values())

    @property
    def held(self) -> int:
        """Bytes of RAM buffers held: cached, in use, and spare (wiped)."""
        with self._lock:
            return self._live_bytes() + sum(b.size for b in self._spare)


def envelope_loader(path: Path, data_key: Callable[[], bytes], *, dataset_id: str,
                    version: int) -> Callable[[Allocate], PlainBuffer]:
    """The ``load`` for :meth:`DecryptedCache.use` that the worker runs on a miss: get the
    data key (``data_key()``, e.g. unwrap it), check the stored file
    (:func:`store.open_envelope`), take a buffer of the plaintext size and authenticate and
    decrypt every chunk into it. Raises like :func:`store.decrypt_to_bytes`; on any
    failure the buffer was zeroed (and the cache wipes it again)."""

    def load(allocate: Allocate) -> PlainBuffer:
        key = data_key()
        with store.open_envelope(path, key, dataset_id=dataset_id,
                                 version=version) as envelope:
            # decrypt_into writes every byte, or zeroes them all and raises
            plain = allocate(envelope.size, overwrite=True)
            with plain.view() as view:
                envelope.decrypt_into(view)
        return plain
    return load


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
