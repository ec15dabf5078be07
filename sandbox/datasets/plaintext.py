"""Decrypted datasets in anonymous RAM: a memfd that Polars scans without a file name.

A :class:`PlainBuffer` is a ``memfd_create`` file (close-on-exec, so no child process
inherits it) with one shared mapping in this process. The worker decrypts a dataset
straight into the mapping, and the privacy engine scans it in place: Polars is handed a
file object on the memfd (:meth:`PlainBuffer.reader`), duplicates the descriptor and
memory-maps the same RAM pages. No copy is made, no name exists in any file system, and
when the process dies the kernel frees the memory with it: nothing can be left behind in
a temp directory. The mapping is excluded from core dumps.

Contract: the owner writes through :meth:`view` only; :meth:`wipe` overwrites every
byte of the file with zeros; :meth:`close` wipes, then releases the memory. A buffer can
be reused for another dataset no larger than it (:meth:`shrink`); bytes cut off by
shrinking are zeroed first.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
from pathlib import Path

import numpy as np

__all__ = ["PlainBuffer"]

_NAME = "sbx-plain"


class PlainBuffer:
    """``size`` bytes of RAM (a memfd) holding one decrypted Parquet file."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must be non-negative")
        self._fd = os.memfd_create(_NAME, os.MFD_CLOEXEC)
        self._map: mmap.mmap | None = None
        self._closed = False
        try:
            os.ftruncate(self._fd, size)
            if size:  # mmap cannot map 0 bytes
                self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
                self._map.madvise(mmap.MADV_DONTDUMP)
        except BaseException:
            os.close(self._fd)
            raise
        self._size = size

    @property
    def size(self) -> int:
        """The length of the Parquet file (what Polars sees)."""
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("plaintext buffer is closed")

    def view(self) -> memoryview:
        """A writable view of the ``size`` bytes; release it before :meth:`close`."""
        self._check_open()
        if self._map is None:
            return memoryview(bytearray())
        return memoryview(self._map)[: self._size]

    def shrink(self, size: int) -> None:
        """Make the file ``size`` bytes long, ``0 <= size <= self.size``, for reuse by a
        smaller dataset. The bytes cut off are zeroed before the kernel drops them; the
        mapping is kept, so the bytes kept cost no new page faults."""
        self._check_open()
        if not 0 <= size <= self._size:
            raise ValueError(f"size {size} is outside 0..{self._size}")
        with self.view() as view:
            _zero(view[size:])
        os.ftruncate(self._fd, size)
        self._size = size

    def wipe(self) -> None:
        """Overwrite the whole file with zeros (the memory stays allocated for reuse)."""
        with self.view() as view:
            _zero(view)

    def reader(self) -> io.FileIO:
        """A read-only file object on the memfd for ``pl.scan_parquet``; Polars duplicates
        the descriptor, and closing this object leaves the buffer open."""
        self._check_open()
        return io.FileIO(self._fd, "rb", closefd=False)

    @property
    def proc_path(self) -> Path:
        """``/proc/self/fd/N``: a path to the memfd valid in this process only, for code
        that takes a path. Valid while the buffer is open."""
        self._check_open()
        return Path(f"/proc/self/fd/{self._fd}")

    def close(self) -> None:
        """Wipe, unmap and close; idempotent. A mapping still exported (a live
        :meth:`view`) is wiped but stays mapped until that view is released."""
        if self._closed:
            return
        self.wipe()
        self._closed = True
        mapping, self._map = self._map, None
        if mapping is not None:
            # a view still alive keeps the (zeroed) pages mapped until it is released
            with contextlib.suppress(BufferError):
                mapping.close()
        os.close(self._fd)


def _zero(view: memoryview) -> None:
    if view.nbytes:
        np.frombuffer(view, dtype=np.uint8).fill(0)
