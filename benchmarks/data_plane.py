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
from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.datasets.ingest import iter_validated_batches
from sandbox.datasets.keys import new_data_key


def query(path: Path) -> pl.DataFrame:
    """A broker-style lazy query: projection of five columns, group-by, aggregates."""
    return (pl.scan_parquet(path).group_by("city")
            .agg(pl.len(), pl.col("annual_revenue").sum(), pl.col("tax_paid").sum(),
                 pl.col("employees").mean(), pl.col("founded_year").min())
            .collect())


def full_load(path: Path) -> pl.DataFrame:
    """Load every column and row into memory, then scan them once."""
    frame = pl.read_parquet(path)
    frame.select(pl.all().null_count())
    return frame


def median_ratio(plain_fn: object, enc_fn: object, repeat: int) -> tuple[float, float]:
    times: dict[str, list[float]] = {"plain": [], "encrypted": []}
    for _ in range(repeat):
        for name, fn in (("plain", plain_fn), ("encrypted", enc_fn)):
            started = time.perf_counter()
            fn()  # type: ignore[operator]
            times[name].append(time.perf_counter() - started)
    return statistics.median(times["plain"]), statistics.median(times["encrypted"])


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
    encrypted_path = work / "data.sbxenc"
    info = store.encrypt_table(table, encrypted_path, key, dataset_id="bench", version=1)

    def encrypted(scan: object) -> object:
        def run() -> None:
            with store.decrypted_file(encrypted_path, key, dataset_id="bench", version=1,
                                      tmpfs_dir=Path("/dev/shm")) as path:
                scan(path)  # type: ignore[operator]
        return run

    results = {}
    for label, scan in (("query", query), ("full load", full_load)):
        scan(plain)  # type: ignore[operator]
        encrypted(scan)()  # type: ignore[operator]
        results[label] = median_ratio(lambda s=scan: s(plain), encrypted(scan), args.repeat)

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
    for label, (p, e) in results.items():
        print(f"{label:>9}: plaintext Parquet {p:.3f} s, encrypted store {e:.3f} s "
              f"(decrypt to RAM + same read), ratio {e / p:.3f}  (goal <= 1.10)")
    for label, (mbps, seconds) in ingest.items():
        print(f"ingest {label}: {mbps:.0f} MB/s of input ({seconds:.1f} s, validate + encrypt)")
    for path in work.iterdir():
        path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
