"""Privacy-engine benchmark: DP group-by vs the same plain Polars group-by, side by side.

    .venv/bin/python benchmarks/privacy_engine.py --rows 10000000

On generated rows with 30 public keys: count + sum per key through the engine (the
broker's Polars plus OpenDP noise and accounting, session filter included) vs the same
plain Polars group-by on the same Parquet file; also OpenDP's documented
``Context.query(...).release()`` path, a DP median and a group-by with DP-released keys.
Medians of repeated runs. Goal: DP / plain <= 1.5.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import opendp.prelude as dp
import polars as pl

from sandbox.datasets.schema import DatasetSchema
from sandbox.privacy import engine
from sandbox.privacy.mechanisms import DatasetHandle, open_session
from sandbox.privacy.spec import QuerySpec

KEYS = [f"k{i:02d}" for i in range(30)]


def schema(rows: int) -> DatasetSchema:
    return DatasetSchema.from_dict({
        "name": "bench", "title": "bench", "owner_organisation": "bench",
        "privacy_unit": {}, "max_rows": rows * 2,
        "columns": [
            {"name": "key", "type": "category", "categories": KEYS, "classification": "L1"},
            {"name": "value", "type": "float", "bounds": [0, 100], "classification": "L2"},
        ]})


def timed(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm up
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    frame = pl.DataFrame({"key": pl.Series(rng.choice(KEYS, args.rows)),
                          "value": rng.uniform(0, 100, args.rows)})
    work = Path(tempfile.mkdtemp(prefix="bench-dp-", dir="/dev/shm"))
    path = work / "data.parquet"
    frame.write_parquet(path, compression="zstd", row_group_size=1_048_576)
    del frame
    sch = schema(args.rows)
    handle = DatasetHandle(path)

    def dp_query(query: QuerySpec) -> Callable[[], object]:
        def run() -> object:
            plan = engine.plan(query, sch)
            session = open_session(handle, unit="epsilon", approximate=query.delta is not None,
                                   d_in=1, left=10.0,
                                   delta_left=1e-6 if query.delta is not None else 0.0)
            return engine.execute(plan, session, handle, approximate=query.delta is not None)
        return run

    group_by = QuerySpec.model_validate({
        "dataset": "bench", "group_by": ["key"], "epsilon": 1.0,
        "aggregates": [{"kind": "count"}, {"kind": "sum", "column": "value"}]})
    median = QuerySpec.model_validate({
        "dataset": "bench", "epsilon": 1.0,
        "aggregates": [{"kind": "median", "column": "value"}]})
    dp_keys = group_by.model_copy(update={"keys": "dp", "delta": 1e-7})

    def plain() -> object:
        return (pl.scan_parquet(path).group_by("key")
                .agg(pl.len(), pl.col("value").fill_null(0).clip(0, 100).sum()).collect())

    def plain_median() -> object:
        return pl.scan_parquet(path).select(pl.col("value").median()).collect()

    def opendp_documented() -> object:
        context = dp.Context.compositor(
            data=pl.scan_parquet(path), privacy_unit=dp.unit_of(contributions=1),
            privacy_loss=dp.loss_of(epsilon=1.0), split_evenly_over=1,
            margins=[dp.polars.Margin(by=["key"], invariant="keys", max_groups=30),
                     dp.polars.Margin(by=[], max_length=args.rows * 2)])
        query = context.query().group_by("key").agg(
            pl.len().dp.noise(), pl.col("value").fill_null(0.0).dp.sum((0.0, 100.0)))
        return query.release().collect()

    t_plain = timed(plain, args.repeat)
    t_dp = timed(dp_query(group_by), args.repeat)
    t_doc = timed(opendp_documented, max(1, args.repeat // 2))
    t_plain_median = timed(plain_median, args.repeat)
    t_median = timed(dp_query(median), args.repeat)
    t_keys = timed(dp_query(dp_keys), args.repeat)
    print(f"rows: {args.rows:,}, 30 public keys, epsilon 1 per query (medians of "
          f"{args.repeat})")
    print(f"plain Polars group-by (count + sum):      {t_plain:.3f} s")
    print(f"DP group-by through the engine:           {t_dp:.3f} s   ratio {t_dp / t_plain:.2f}"
          "  (goal <= 1.5)")
    print(f"OpenDP documented Context...release():    {t_doc:.3f} s   ratio {t_doc / t_plain:.2f}")
    print(f"plain Polars median:                      {t_plain_median:.3f} s")
    print(f"DP median (256 candidates):               {t_median:.3f} s   ratio "
          f"{t_median / t_plain_median:.2f}")
    print(f"DP group-by with DP-released keys:        {t_keys:.3f} s   ratio "
          f"{t_keys / t_plain:.2f}")
    path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
