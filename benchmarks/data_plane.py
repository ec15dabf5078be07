"""Data-plane benchmark: encrypted load+scan vs plaintext Parquet load+scan; ingest MB/s.

    .venv/bin/python benchmarks/data_plane.py --rows 10000000

Both sides run in one process, alternating, on the same generated data; the ratio is of
medians. "Load and scan" is what the broker does for a query: for the encrypted store,
read the envelope, decrypt, place the Parquet bytes in RAM (tmpfs) and scan; for the
plaintext side, scan the same Parquet file directly. Goal: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from sandbox.datasets import store
from sandbox.datasets.cache import materialise
from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.datasets.ingest import iter_validated_batches
from sandbox.datasets.keys import new_data_key


def scan(path: Path) -> pl.DataFrame:
    return (pl.scan_parquet(path).group_by("city")
            .agg(pl.len(), pl.col("annual_revenue").sum(), pl.col("tax_paid").sum(),
                 pl.col("employees").mean(), pl.col("founded_year").min())
            .collect())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="where files go (disk)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-data-", dir=args.dir))
    schema = enterprise_schema(args.rows)
    table = generate_enterprises(args.rows, seed=1)
    plain = work / "plain.parquet"
    pq.write_table(table, plain, compression="zstd", row_group_size=1_048_576)
    key = new_data_key()
    encrypted = work / "data.sbxenc"
    info = store.encrypt_table(table, encrypted, key, dataset_id="bench", version=1)

    def encrypted_load_scan() -> None:
        buffer = store.decrypt_to_bytes(encrypted, key, dataset_id="bench", version=1)
        with materialise(buffer, Path("/dev/shm")) as path:
            scan(path)

    def plain_load_scan() -> None:
        scan(plain)

    plain_load_scan()
    encrypted_load_scan()  # warm the page cache for both files
    times: dict[str, list[float]] = {"plain": [], "encrypted": []}
    for _ in range(args.repeat):
        for name, fn in (("plain", plain_load_scan), ("encrypted", encrypted_load_scan)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    p, e = statistics.median(times["plain"]), statistics.median(times["encrypted"])

    csv_path = work / "data.csv"
    pcsv.write_csv(table, csv_path)
    del table
    ingest = {}
    for label, source in (("csv", csv_path), ("parquet", plain)):
        out = work / f"ingest-{label}.sbxenc"
        started = time.perf_counter()
        store.write_encrypted_parquet(iter_validated_batches(source, schema),
                                      schema.arrow_schema(), out, key, dataset_id="bench",
                                      version=2)
        seconds = time.perf_counter() - started
        ingest[label] = (source.stat().st_size / 1e6 / seconds, seconds)

    print(f"rows: {args.rows:,}; stored envelope {info.path.stat().st_size / 1e6:.1f} MB, "
          f"plaintext Parquet {plain.stat().st_size / 1e6:.1f} MB")
    print(f"load+scan plaintext Parquet: median {p:.3f} s")
    print(f"load+scan encrypted store:   median {e:.3f} s")
    print(f"ratio encrypted/plaintext:   {e / p:.3f}  (goal <= 1.10)")
    for label, (mbps, seconds) in ingest.items():
        print(f"ingest {label}: {mbps:.0f} MB/s of input ({seconds:.1f} s, validate + encrypt)")
    for path in work.iterdir():
        path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
