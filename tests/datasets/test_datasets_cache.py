"""The worker's decrypted data in RAM: memfd buffers, the byte-capped cache, the handle."""

from __future__ import annotations

import fcntl
import io
import os
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sandbox.datasets.cache import Allocate, DecryptedCache, envelope_loader
from sandbox.datasets.envelope import IntegrityError
from sandbox.datasets.keys import new_data_key
from sandbox.datasets.plaintext import PlainBuffer
from sandbox.datasets.store import encrypt_table, open_envelope
from sandbox.privacy.mechanisms import DatasetHandle


def parquet_bytes(rows: int, value: int) -> bytes:
    sink = io.BytesIO()
    pq.write_table(pa.table({"a": list(range(rows)), "b": [value] * rows}), sink)
    return sink.getvalue()


def filled(data: bytes) -> PlainBuffer:
    buffer = PlainBuffer(len(data))
    with buffer.view() as view:
        view[:] = data
    return buffer


def contents(buffer: PlainBuffer) -> bytes:
    with buffer.view() as view:
        return bytes(view)


# -- PlainBuffer -------------------------------------------------------------------------


def test_buffer_is_an_anonymous_close_on_exec_memfd() -> None:
    buffer = PlainBuffer(10)
    try:
        target = os.readlink(buffer.proc_path)
        assert target.startswith("/memfd:sbx-plain")  # no name in any file system
        fd = int(buffer.proc_path.name)
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith("sbx-plain")]
    finally:
        buffer.close()


def test_polars_scans_the_buffer_in_place_and_sees_new_contents() -> None:
    first, second = parquet_bytes(1000, 1), parquet_bytes(500, 2)
    buffer = filled(first)
    try:
        handle = DatasetHandle(buffer)
        total = handle.lazy(["a", "b"]).select(pl.len(), pl.col("b").sum()).collect()
        assert total.row(0) == (1000, 1000)
        buffer.shrink(len(second))  # reused for another dataset
        with buffer.view() as view:
            view[:] = second
        total = handle.lazy(["b"]).select(pl.len(), pl.col("b").sum()).collect()
        assert total.row(0) == (500, 1000)
        path_scan = pl.scan_parquet(buffer.proc_path).select(pl.col("b").sum()).collect()
        assert path_scan.item() == 1000
    finally:
        buffer.close()


def test_scans_do_not_leak_descriptors() -> None:
    buffer = filled(parquet_bytes(100, 1))
    try:
        handle = DatasetHandle(buffer)
        handle.lazy(["a"]).collect()
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            handle.lazy(["a"]).select(pl.col("a").sum()).collect()
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        buffer.close()


def test_shrink_zeroes_the_cut_and_wipe_and_close_zero_everything() -> None:
    buffer = filled(b"\x01" * 100)
    view = buffer.view()  # an alias that outlives close (it must see zeros)
    buffer.shrink(40)
    assert buffer.size == 40 and os.fstat(int(buffer.proc_path.name)).st_size == 40
    assert not any(view[40:])
    assert contents(buffer) == b"\x01" * 40
    buffer.wipe()
    assert contents(buffer) == bytes(40)
    with buffer.view() as again:
        again[:] = b"\x02" * 40
    buffer.close()
    assert buffer.closed and not any(view[:40])
    view.release()
    buffer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        buffer.view()
    with pytest.raises(ValueError, match="outside"):
        PlainBuffer(5).shrink(6)


def test_empty_buffer() -> None:
    buffer = PlainBuffer(0)
    assert contents(buffer) == b""
    buffer.wipe()
    buffer.close()


# -- DecryptedCache ----------------------------------------------------------------------


def loader(data: bytes, log: list[PlainBuffer] | None = None) -> Callable[[Allocate], PlainBuffer]:
    def load(allocate: Allocate) -> PlainBuffer:
        buffer = allocate(len(data))
        assert contents(buffer) == bytes(len(data)), "allocated memory must come wiped"
        with buffer.view() as view:
            view[:] = data
        if log is not None:
            log.append(buffer)
        return buffer
    return load


def test_hit_and_miss() -> None:
    cache = DecryptedCache(1000)
    with cache.use(("d", 1, "h"), loader(b"a" * 100)) as first:
        assert contents(first) == b"a" * 100
    with cache.use(("d", 1, "h"), loader(b"other")) as second:
        assert second is first
    assert (cache.hits, cache.misses, cache.size) == (1, 1, 100)
    cache.clear()
    assert cache.size == 0 and cache.held == 0 and first.closed


def test_eviction_wipes_and_memory_is_reused_under_the_cap() -> None:
    cache = DecryptedCache(250)
    with cache.use(("a", 1, "h"), loader(b"a" * 100)) as a:
        pass
    with cache.use(("b", 1, "h"), loader(b"b" * 100)):
        pass
    seen: list[PlainBuffer] = []
    with cache.use(("c", 1, "h"), loader(b"c" * 90, seen)) as c:
        assert c is a  # a (least recently used) was evicted, wiped, its memory reused
        assert contents(c) == b"c" * 90
    assert cache.size == 190 and cache.held <= 250
    with cache.use(("a", 1, "h"), loader(b"A" * 100)) as again:
        assert contents(again) == b"A" * 100  # a miss now: decrypted again
    assert cache.misses == 4 and cache.held <= 250
    cache.clear()


def test_evicted_buffer_is_zeroed_at_once() -> None:
    cache = DecryptedCache(150)
    with cache.use(("a", 1, "h"), loader(b"a" * 100)) as a:
        pass
    with cache.use(("b", 1, "h"), loader(b"b" * 120)) as b:
        assert b is not a  # a's memory is too small to reuse: it was released
        assert a.closed
    cache.clear()


def overwriting(data: bytes, fail: bool = False,
                seen: list[bytes] | None = None) -> Callable[[Allocate], PlainBuffer]:
    """A load that promises to overwrite every byte (like the envelope loader)."""
    def load(allocate: Allocate) -> PlainBuffer:
        buffer = allocate(len(data), overwrite=True)
        if seen is not None:
            seen.append(contents(buffer))
        if fail:
            raise IntegrityError("chunk 0 of 1 failed authentication")
        with buffer.view() as view:
            view[:] = data
        return buffer
    return load


def test_an_overwriting_load_gets_the_evicted_memory_unwiped_but_nothing_beyond() -> None:
    cache = DecryptedCache(100)
    with cache.use(("a", 1, "h"), loader(b"a" * 100)) as a:
        pass
    seen: list[bytes] = []
    with cache.use(("b", 1, "h"), overwriting(b"b" * 60, seen=seen)) as b:
        assert b is a and b.size == 60
        assert seen == [b"a" * 60]  # not zeroed first: the load overwrites it
        assert contents(b) == b"b" * 60
        os.lseek(int(b.proc_path.name), 0, os.SEEK_SET)
        assert os.read(int(b.proc_path.name), 200) == b"b" * 60  # a's tail is gone
    # a load that does not promise to overwrite still gets zeroed memory
    with cache.use(("c", 1, "h"), loader(b"c" * 50)) as c:
        assert c is a and contents(c) == b"c" * 50
    cache.clear()


def test_an_overwriting_load_that_fails_leaves_the_evicted_memory_wiped() -> None:
    cache = DecryptedCache(100)
    with cache.use(("a", 1, "h"), loader(b"a" * 100)) as a:
        pass
    with pytest.raises(IntegrityError), cache.use(("b", 1, "h"), overwriting(b"b" * 100,
                                                                                fail=True)):
        pass
    assert cache.size == 0
    assert a.closed or contents(a) == bytes(a.size)
    with cache.use(("c", 1, "h"), loader(b"c" * 100)) as c:  # asserts it comes wiped
        assert contents(c) == b"c" * 100
    cache.clear()


def test_evicted_memory_too_small_for_an_overwriting_load_is_wiped() -> None:
    cache = DecryptedCache(130)
    with cache.use(("a", 1, "h"), loader(b"a" * 50)) as a:
        pass
    with cache.use(("b", 1, "h"), loader(b"b" * 60)):
        pass
    with cache.use(("c", 1, "h"), overwriting(b"c" * 80)) as c:
        assert c is not a and contents(c) == b"c" * 80
        assert a.closed or contents(a) == bytes(a.size)
    cache.clear()


def test_buffers_in_use_are_not_evicted() -> None:
    cache = DecryptedCache(150)
    with cache.use(("a", 1, "h"), loader(b"a" * 100)) as a:
        with cache.use(("b", 1, "h"), loader(b"b" * 100)) as b:
            assert contents(a) == b"a" * 100  # pinned: untouched while its job runs
            assert contents(b) == b"b" * 100
        assert cache.held <= 250
    assert cache.size == 100  # b did not fit beside a: it served its job only
    assert b.closed or not any(contents(b))
    assert cache.held <= 150
    cache.clear()


def test_dataset_larger_than_the_cap_is_served_and_dropped() -> None:
    cache = DecryptedCache(50)
    with cache.use(("big", 1, "h"), loader(b"x" * 80)) as big:
        assert contents(big) == b"x" * 80
    assert big.closed and cache.size == 0 and cache.held == 0


def test_failed_load_wipes_what_it_was_given() -> None:
    cache = DecryptedCache(1000)
    given: list[PlainBuffer] = []

    def failing(allocate: Allocate) -> PlainBuffer:
        buffer = allocate(64)
        with buffer.view() as view:
            view[:] = b"p" * 64
        given.append(buffer)
        raise IntegrityError("chunk 1 of 2 failed authentication")

    with pytest.raises(IntegrityError), cache.use(("d", 1, "h"), failing):
        pass
    assert cache.size == 0 and cache.misses == 0
    assert given[0].closed or contents(given[0]) == bytes(64)
    cache.clear()


def test_clear_while_in_use_wipes_at_release() -> None:
    cache = DecryptedCache(1000)
    with cache.use(("d", 1, "h"), loader(b"s" * 10)) as buffer:
        cache.clear()
        assert contents(buffer) == b"s" * 10
    assert buffer.closed or contents(buffer) == bytes(10)
    assert cache.size == 0


# -- the worker's loader over a stored envelope ------------------------------------------


def test_envelope_loader_authenticates_into_the_buffer(tmp_path: Path) -> None:
    table = pa.table({"a": list(range(5000)), "b": [1.5] * 5000})
    key = new_data_key()
    path = tmp_path / "d.sbxenc"
    info = encrypt_table(table, path, key, dataset_id="ds", version=1, chunk_size=4096)
    cache = DecryptedCache(10**7)
    load = envelope_loader(path, lambda: key, dataset_id="ds", version=1)
    with cache.use(("ds", 1, info.ciphertext_sha256), load) as plain:
        assert plain.size == info.plaintext_bytes
        frame = DatasetHandle(plain).lazy(["a", "b"]).collect()
        assert frame.to_arrow().equals(table)
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 1  # the final chunk fails, after the others were decrypted
    path.write_bytes(raw)
    seen: list[PlainBuffer] = []

    def spying(allocate: Allocate) -> PlainBuffer:
        def remember(size: int, *, overwrite: bool = False) -> PlainBuffer:
            seen.append(allocate(size, overwrite=overwrite))
            return seen[-1]
        return load(remember)

    with pytest.raises(IntegrityError, match="failed authentication"), \
            cache.use(("ds", 1, "tampered"), spying):
        pass
    assert seen and (seen[0].closed or not any(contents(seen[0])))
    with open_envelope(path, key, dataset_id="ds", version=1) as envelope, \
            pytest.raises(ValueError, match="must be"):
        envelope.decrypt_into(bytearray(envelope.size + 1))
    cache.clear()


def test_a_load_in_flight_counts_towards_the_cap() -> None:
    cache = DecryptedCache(150)
    inner: list[PlainBuffer] = []

    def outer(allocate: Allocate) -> PlainBuffer:
        buffer = allocate(100)
        with buffer.view() as view:
            view[:] = b"o" * 100
        # another job loads meanwhile (as another thread would): the room is taken
        with cache.use(("inner", 1, "h"), loader(b"i" * 100, inner)) as other:
            assert contents(other) == b"i" * 100
            assert cache.held == 200  # over the cap only while both jobs run
        assert other.closed  # served that job only, then wiped and released
        return buffer

    with cache.use(("outer", 1, "h"), outer) as buffer:
        assert contents(buffer) == b"o" * 100
    assert cache.size == 100 and cache.held <= 150
    cache.clear()


def test_reserved_memory_serves_the_first_load_that_fits() -> None:
    cache = DecryptedCache(300)
    assert cache.reserve(200)
    assert cache.held == 200 and cache.size == 0
    [reserved] = cache._spare  # type: ignore[attr-defined]
    with cache.use(("a", 1, "h"), loader(b"a" * 150)) as a:  # the loader asserts zeroes
        assert a is reserved and a.size == 150
    assert not cache.reserve(200)  # 150 cached + 200 > 300: nothing reserved
    assert cache.held == 150
    assert not cache.reserve(0)
    cache.clear()
    assert cache.held == 0 and reserved.closed


def test_a_failed_reserve_holds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    cache = DecryptedCache(300)

    def broken(self: PlainBuffer) -> None:
        raise MemoryError("no room")

    monkeypatch.setattr(PlainBuffer, "wipe", broken)
    with pytest.raises(MemoryError):
        cache.reserve(100)
    monkeypatch.undo()
    assert cache.held == 0


def test_plaintext_directory_must_be_ram_backed() -> None:
    from sandbox.datasets.cache import check_ram_filesystem, filesystem_type
    from sandbox.errors import Conflict

    check_ram_filesystem(Path("/dev/shm"))  # tmpfs: accepted
    disk = Path(__file__).resolve().parent  # the checkout: on disk
    assert filesystem_type(disk) not in ("tmpfs", "ramfs")
    with pytest.raises(Conflict, match=r"not\s+tmpfs/ramfs"):
        check_ram_filesystem(disk)


def test_a_load_during_a_reserve_waits_and_gets_the_reserved_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    cache = DecryptedCache(100)
    real = PlainBuffer.wipe
    filling, go_on = threading.Event(), threading.Event()

    def slow(self: PlainBuffer) -> None:
        if not filling.is_set():
            filling.set()
            go_on.wait(5)
        real(self)

    monkeypatch.setattr(PlainBuffer, "wipe", slow)
    reserving = threading.Thread(target=cache.reserve, args=(80,))
    reserving.start()
    assert filling.wait(5)
    peak = [0]

    def loading() -> None:
        with cache.use(("a", 1, "h"), loader(b"a" * 60)) as a:
            peak[0] = max(peak[0], cache.held)
            assert contents(a) == b"a" * 60
            seen.append(a)

    seen: list[PlainBuffer] = []
    job = threading.Thread(target=loading)
    job.start()
    go_on.set()
    reserving.join(10)
    job.join(10)
    assert seen and cache.size == 60  # cached: it fitted, in the reserved memory
    assert peak[0] <= 100 and cache.held <= 100
    cache.clear()
