"""Data-plane benchmark: encrypted load+scan vs plaintext Parquet load+scan; ingest MB/s.

    .venv/bin/python benchmarks/data_plane.py --rows 10000000 --repeat 7

All sides run in one process, alternating within each repetition (in reverse order every
other one), on the same generated data, through the same scan code
(``DatasetHandle.lazy``). The ratio is of medians; "paired" is the median of the
per-repetition ratios, less sensitive to load that changes during the run.

* plaintext: the handle scans the zstd Parquet file directly.
* encrypted, cold (the headline): what the worker does for a job whose dataset is not in
  its cache, through the worker's own code (``DecryptedCache.use`` with
  ``envelope_loader``): evict the least recently used dataset (wiping it), unwrap the
  data key under a local master key, check the envelope (read through the worker's
  reusable map of the stored file), authenticate and decrypt every chunk into the RAM
  buffer, then scan that buffer in place. Two envelopes
  of the same table take turns in a cache with room for one, so every job misses.
* encrypted, warm: the dataset is in the cache: no decryption, the same in-place scan.
* encrypted, a new worker's first job: the cache has no memory yet and the stored file is
  not mapped yet, so the pages of both are touched for the first time; and the same after
  the reserve a worker makes in the background when it starts
  (``Worker.reserve_cache_memory``: cache memory for the largest dataset faulted in
  ahead; the stored file is still mapped afresh). For information; measured in their own
  alternation with the plaintext side, after the others.

Goal: cold ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pcsv

from sandbox.datasets import store
from sandbox.datasets.cache import DecryptedCache, envelope_loader
from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.datasets.ingest import iter_validated_batches
from sandbox.datasets.keys import LocalKeyFileProvider, new_data_key
from sandbox.datasets.mapped import MAPS
from sandbox.datasets.plaintext import PlainBuffer
from sandbox.privacy.mechanisms import DatasetHandle

QUERY_COLUMNS = ["city", "annual_revenue", "tax_paid", "employees", "founded_year"]


def query(handle: DatasetHandle) -> pl.DataFrame:
    """A broker-style lazy query: projection of five columns, group-by, aggregates."""
    return (handle.lazy(QUERY_COLUMNS).group_by("city")
            .agg(pl.len(), pl.col("annual_revenue").sum(), pl.col("tax_paid").sum(),
                 pl.col("employees").mean(), pl.col("founded_year").min())
            .collect())


def full_load(handle: DatasetHandle, columns: list[str]) -> pl.DataFrame:
    """Load every column and row into memory, then scan them once."""
    frame = handle.lazy(columns).collect()
    frame.select(pl.all().null_count())
    return frame


class Encrypted:
    """Stored envelopes of one table and the worker's cache path over them."""

    def __init__(self, work: Path, table: pa.Table, count: int) -> None:
        self.master = LocalKeyFileProvider.create(work / "master.key")
        self.stored: list[tuple[Path, bytes]] = []
        for i in range(count):
            key = new_data_key()
            path = work / f"data-{i}.sbxenc"
            self.info = store.encrypt_table(table, path, key, dataset_id=f"bench-{i}",
                                            version=1)
            self.stored.append((path, self.master.wrap(key, context=self._context(i))))
        self.size = self.info.plaintext_bytes

    @staticmethod
    def _context(i: int) -> bytes:
        return f"bench:{i}:1".encode()

    @contextlib.contextmanager
    def job(self, cache: DecryptedCache, i: int) -> Iterator[DatasetHandle]:
        """Dataset ``i`` as a job sees it (a miss decrypts, a hit does not)."""
        path, wrapped = self.stored[i]
        load = envelope_loader(
            path, lambda: self.master.unwrap(wrapped, context=self._context(i)),
            dataset_id=f"bench-{i}", version=1)
        with cache.use((f"bench-{i}", 1, path.name), load) as plain:
            yield DatasetHandle(plain)


def timings(sides: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Seconds of each side per repetition. The sides alternate within every repetition,
    in reverse order every other one (so no side always runs after the same one)."""
    for fn in sides.values():  # warm up: imports, thread pools, allocator, page cache
        after = fn()
        if callable(after):
            after()
    times: dict[str, list[float]] = {name: [] for name in sides}
    order = list(sides)
    for rep in range(repeat):
        for name in order if rep % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            after = sides[name]()
            times[name].append(time.perf_counter() - started)
            if callable(after):  # clean-up that is not part of the job
                after()
    return times


def ratios(times: dict[str, list[float]], side: str) -> tuple[float, float, float]:
    """``(median seconds, ratio of medians to plaintext, median of the per-repetition
    ratios)``: the second is the headline; the third is less sensitive to load that
    changes during the run."""
    median = statistics.median(times[side])
    paired = statistics.median(e / p for e, p in zip(times[side], times["plain"], strict=True))
    return median, median / statistics.median(times["plain"]), paired


def decrypt_rate(enc: Encrypted, repeat: int) -> float:
    """Median seconds to authenticate and decrypt one envelope into a reused buffer."""
    path, wrapped = enc.stored[0]
    key = enc.master.unwrap(wrapped, context=enc._context(0))
    plain = PlainBuffer(enc.size)
    seconds = []
    try:
        for _ in range(repeat + 1):
            started = time.perf_counter()
            with store.open_envelope(path, key, dataset_id="bench-0", version=1) as envelope, \
                    plain.view() as view:
                envelope.decrypt_into(view)
            seconds.append(time.perf_counter() - started)
    finally:
        plain.close()
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where files go (disk)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.dir))
    try:
        run(args, work)
    finally:  # also when interrupted: the working files hold generated plaintext
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    """Generate the data in ``work``, measure, print."""
    schema = enterprise_schema(args.rows)
    table = generate_enterprises(args.rows, seed=1)
    columns = table.column_names
    enc = Encrypted(work, table, 2)
    plain = work / "plain.parquet"  # the very Parquet bytes inside the envelopes
    path, wrapped = enc.stored[0]
    plain.write_bytes(store.decrypt_to_bytes(
        path, enc.master.unwrap(wrapped, context=enc._context(0)), dataset_id="bench-0",
        version=1))
    plain_handle = DatasetHandle(plain)
    cold_cache = DecryptedCache(enc.size)  # room for one: the two envelopes take turns
    warm_cache = DecryptedCache(enc.size)
    turn = [0]

    def sides(scan: Callable[[DatasetHandle], object]) -> dict[str, Callable[[], object]]:
        def cold() -> None:
            turn[0] ^= 1
            with enc.job(cold_cache, turn[0]) as handle:
                scan(handle)

        def warm() -> None:
            with enc.job(warm_cache, 0) as handle:
                scan(handle)

        return {"plain": lambda: scan(plain_handle), "cold": cold, "warm": warm}

    def first_job(scan: Callable[[DatasetHandle], object]) -> dict[str, Callable[[], object]]:
        """A new worker's first job (fresh buffer memory, the stored file not yet mapped),
        in its own alternation with the plaintext scan, after the main sides."""
        def new_memory() -> Callable[[], None]:
            cache = DecryptedCache(enc.size)
            with enc.job(cache, 0) as handle:
                scan(handle)

            def stop_worker() -> None:  # a new worker has no memory and no file maps
                cache.clear()
                MAPS.clear()
            return stop_worker

        ready: list[DecryptedCache] = []

        def start_worker() -> None:  # what a worker does when it starts, before any job
            cache = DecryptedCache(enc.size)
            cache.reserve(enc.size)
            MAPS.clear()
            ready.append(cache)

        def reserved() -> Callable[[], None]:
            cache = ready.pop()
            with enc.job(cache, 0) as handle:
                scan(handle)

            def restart_worker() -> None:
                cache.clear()
                start_worker()
            return restart_worker

        start_worker()
        return {"plain": lambda: scan(plain_handle), "new memory": new_memory,
                "reserved": reserved}

    def full(handle: DatasetHandle) -> object:
        return full_load(handle, columns)

    results = {"query": timings(sides(query), args.repeat),
               "full load": timings(sides(full), args.repeat)}
    firsts = {"query": timings(first_job(query), args.repeat),
              "full load": timings(first_job(full), args.repeat)}
    decrypt_seconds = decrypt_rate(enc, args.repeat)
    misses = cold_cache.misses
    cold_cache.clear()
    warm_cache.clear()

    csv_path = work / "data.csv"
    pcsv.write_csv(table, csv_path)
    del table
    ingest = {}
    for label, source in (("csv", csv_path), ("parquet", plain)):
        out = work / f"ingest-{label}.sbxenc"
        started = time.perf_counter()
        store.write_encrypted_parquet(iter_validated_batches(source, schema),
                                      schema.arrow_schema(), out, new_data_key(),
                                      dataset_id="bench", version=2)
        seconds = time.perf_counter() - started
        ingest[label] = (source.stat().st_size / 1e6 / seconds, seconds)

    print(f"rows: {args.rows:,}; stored envelope {enc.info.path.stat().st_size / 1e6:.1f} MB, "
          f"plaintext Parquet {plain.stat().st_size / 1e6:.1f} MB; repeat {args.repeat}")
    print(f"decrypt: {enc.size / 1e6:.0f} MB authenticated and decrypted in "
          f"{decrypt_seconds:.3f} s ({enc.size / 1e9 / decrypt_seconds:.1f} GB/s, "
          f"{store.DECRYPT_THREADS} threads)")
    for label, t in results.items():
        plain_s = statistics.median(t["plain"])
        cold, cold_ratio, cold_paired = ratios(t, "cold")
        warm, warm_ratio, warm_paired = ratios(t, "warm")
        print(f"{label:>9}: plaintext Parquet {plain_s:.3f} s; encrypted store, cold (decrypt "
              f"+ scan) {cold:.3f} s, ratio {cold_ratio:.3f} (goal <= 1.10; paired "
              f"{cold_paired:.3f}); warm (cached) {warm:.3f} s, ratio {warm_ratio:.3f} "
              f"(paired {warm_paired:.3f})")
    for label, t in firsts.items():
        first, first_ratio, first_paired = ratios(t, "new memory")
        print(f"{label:>9}, a new worker's first job (fresh memory and file map): "
              f"plaintext Parquet {statistics.median(t['plain']):.3f} s, encrypted store "
              f"{first:.3f} s, ratio {first_ratio:.3f} (paired {first_paired:.3f})")
        first, first_ratio, first_paired = ratios(t, "reserved")
        print(f"{label:>9}, the same after the worker's start-up reserve (memory faulted "
              f"in ahead, fresh file map): encrypted store {first:.3f} s, ratio "
              f"{first_ratio:.3f} (paired {first_paired:.3f})")
    print(f"cold jobs that missed the cache: {misses} (every one)")
    for label, (mbps, seconds) in ingest.items():
        print(f"ingest {label}: {mbps:.0f} MB/s of input ({seconds:.1f} s, validate + encrypt)")


if __name__ == "__main__":
    main()
