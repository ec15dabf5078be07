"""Streaming ingest: global row numbers across batches, limits enforced while streaming,
the privacy-unit check across batches, corrupt and bomb Parquet, flat memory, and the
ingest -> encrypted store pipeline leaving nothing behind on failure."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from sandbox.datasets import ingest
from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.datasets.ingest import IngestError, iter_validated_batches, read_validated
from sandbox.datasets.keys import new_data_key
from sandbox.datasets.schema import DatasetSchema
from sandbox.datasets.store import load_table, write_encrypted_parquet

SchemaDict = Callable[..., dict[str, Any]]
HEADER = "id,city,revenue,employees,active,founded,note"
TINY_BLOCK = 200  # bytes: a few rows per CSV block


def row(i: int, **change: str) -> str:
    values = {
        "id": f"a{i}",
        "city": "Nanjing",
        "revenue": "1.5",
        "employees": "3",
        "active": "true",
        "founded": "2001-02-03",
        "note": "x",
    }
    values.update(change)
    return ",".join(values.values())


def csv_file(tmp_path: Path, rows: list[str], name: str = "d.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([HEADER, *rows]) + "\n", encoding="utf-8")
    return path


def stream(path: Path, schema: DatasetSchema, **kwargs: Any) -> list[pa.RecordBatch]:
    kwargs.setdefault("csv_block_bytes", TINY_BLOCK)
    kwargs.setdefault("batch_rows", 2)
    return list(iter_validated_batches(path, schema, **kwargs))


def test_batches_conform_and_respect_batch_rows(
    small_schema: DatasetSchema, tmp_path: Path
) -> None:
    path = csv_file(tmp_path, [row(i) for i in range(1, 41)])
    batches = stream(path, small_schema, batch_rows=3)
    assert len(batches) > 13 and all(0 < b.num_rows <= 3 for b in batches)
    assert all(b.schema == small_schema.arrow_schema() for b in batches)
    table = pa.Table.from_batches(batches)
    assert table.column("id").to_pylist() == [f"a{i}" for i in range(1, 41)]
    assert table.equals(read_validated(path, small_schema))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"employees": "9999"}, 'row 37, column "employees": value 9999 is above the upper'),
        ({"city": "Beijing"}, "row 37, column \"city\": unknown category 'Beijing'"),
        ({"city": ""}, 'row 37, column "city": missing value'),
        ({"revenue": "inf"}, 'row 37, column "revenue": value inf is not a finite number'),
        ({"employees": "many"}, "row 37, column \"employees\": cannot parse 'many' as int"),
        ({"founded": "2001-02-30"}, 'row 37, column "founded": cannot parse'),
        ({"note": "a,b"}, r"row 37 \(line 38\): expected 7 columns, got 8"),
    ],
)
def test_csv_errors_name_the_global_row(
    small_schema: DatasetSchema, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    rows = [row(i) for i in range(1, 51)]
    rows[36] = row(37, **change)
    path = csv_file(tmp_path, rows)
    with pytest.raises(IngestError, match=message):
        stream(path, small_schema)
    with pytest.raises(IngestError, match=message):  # the same with the default block size
        read_validated(path, small_schema)


def test_nul_byte_in_a_late_block_names_its_line(
    small_schema: DatasetSchema, tmp_path: Path
) -> None:
    rows = [row(i) for i in range(1, 51)]
    rows[39] = row(40, note="x\0y")
    with pytest.raises(IngestError, match="NUL byte at line 41"):
        stream(csv_file(tmp_path, rows), small_schema)


def test_line_longer_than_a_block(small_schema: DatasetSchema, tmp_path: Path) -> None:
    path = csv_file(tmp_path, [row(1), row(2, note="n" * 500)])
    with pytest.raises(IngestError, match="line 3 is longer than 200 bytes"):
        stream(path, small_schema)
    assert len(stream(path, small_schema, csv_block_bytes=1024)) == 1


def parquet_file(tmp_path: Path, table: pa.Table, group: int = 4) -> Path:
    path = tmp_path / "d.parquet"
    pq.write_table(table, path, row_group_size=group, compression="zstd")
    return path


def good_table(n: int) -> pa.Table:
    return pa.table(
        {
            "id": [f"a{i}" for i in range(n)],
            "city": ["Wuxi"] * n,
            "revenue": pa.array(range(n), pa.int32()),  # converted to float
            "employees": pa.array([3] * n, pa.uint16()),
            "active": [True] * n,
            "founded": pa.array([dt.date(2000, 1, 1)] * n, pa.date32()),
            "note": pa.array([None] * n, pa.string()),
        }
    )


def test_parquet_errors_name_the_global_row(small_schema: DatasetSchema, tmp_path: Path) -> None:
    table = good_table(30)
    employees = [3] * 30
    employees[22] = 7000
    table = table.set_column(3, "employees", pa.array(employees, pa.uint16()))
    path = parquet_file(tmp_path, table)
    with pytest.raises(IngestError, match='row 23, column "employees": value 7000 is above'):
        stream(path, small_schema, batch_rows=3)


def test_parquet_conversion_failure_names_the_row(
    small_schema: DatasetSchema, tmp_path: Path
) -> None:
    table = good_table(30)
    employees = [3] * 30
    employees[13] = 2**64 - 1  # does not fit int64
    table = table.set_column(3, "employees", pa.array(employees, pa.uint64()))
    with pytest.raises(IngestError, match='row 14, column "employees": cannot convert uint64'):
        stream(parquet_file(tmp_path, table), small_schema, batch_rows=5)


def test_max_rows_is_enforced_while_streaming(schema_dict: SchemaDict, tmp_path: Path) -> None:
    schema = DatasetSchema.from_dict(schema_dict(max_rows=10))
    path = csv_file(tmp_path, [row(i) for i in range(1, 200)])
    seen: list[int] = []
    with pytest.raises(IngestError, match=r"at least 1\d rows, more than the declared max_rows 10"):
        for batch in iter_validated_batches(path, schema, csv_block_bytes=TINY_BLOCK):
            seen.append(batch.num_rows)
    assert sum(seen) <= 10  # stopped at the block that crossed the bound
    table = good_table(11)
    with pytest.raises(IngestError, match="the file has 11 rows, more than the declared max_rows"):
        stream(parquet_file(tmp_path, table), schema)  # from the footer, before reading


@pytest.mark.parametrize("kind", ["str", "int", "float", "date"])
def test_rows_per_unit_across_batches(schema_dict: SchemaDict, tmp_path: Path, kind: str) -> None:
    data = schema_dict(privacy_unit={"id_column": "uid", "max_rows_per_unit": 2})
    bounds = {"bounds": [-1e6, 1e6]} if kind in ("int", "float") else {}
    data["columns"] = [
        *data["columns"],
        {"name": "uid", "type": kind, "classification": "L4", **bounds},
    ]
    schema = DatasetSchema.from_dict(data)
    n = 60
    uids = list(range(n))
    uids[17] = uids[41] = uids[55] = 5  # unit 5: rows 6, 18, 42, 56 (four rows)
    table = good_table(n).append_column("uid", uid_values(kind, uids))
    if kind == "float":  # -0.0 is the same unit as 0.0: rows 1, 7 and 31
        floats = table.column("uid").to_pylist()
        floats[6], floats[30] = -0.0, 0.0
        table = table.set_column(table.num_columns - 1, "uid", pa.array(floats))
    with pytest.raises(IngestError) as info:
        stream(parquet_file(tmp_path, table), schema, batch_rows=4)
    message = str(info.value)
    first = 1 if kind == "float" else 6
    assert message == (
        f'row {first}, column "uid": a privacy unit has up to 4 rows, '
        "more than max_rows_per_unit = 2"
    )
    assert "secret" not in message
    twice = [i // 2 for i in range(n)]  # every unit exactly at the limit
    ok = good_table(n).append_column("uid", uid_values(kind, twice))
    assert sum(b.num_rows for b in stream(parquet_file(tmp_path, ok), schema, batch_rows=4)) == n


def uid_values(kind: str, uids: list[int]) -> pa.Array:
    if kind == "str":
        return pa.array([f"secret-{u}" for u in uids])
    if kind == "int":
        return pa.array(uids, pa.int64())
    if kind == "float":
        return pa.array([float(u) for u in uids], pa.float64())
    return pa.array([dt.date(2000, 1, 1) + dt.timedelta(days=u) for u in uids], pa.date32())


def test_rows_per_unit_in_csv_blocks(small_schema: DatasetSchema, tmp_path: Path) -> None:
    rows = [row(i) for i in range(1, 80)]
    rows[70] = row(12)  # row 71 repeats the unit of row 12, many blocks later
    with pytest.raises(IngestError, match=r'^row 12, column "id": a privacy unit has up to 2 rows'):
        stream(csv_file(tmp_path, rows), small_schema)


def test_progress_reports_bytes(small_schema: DatasetSchema, tmp_path: Path) -> None:
    path = csv_file(tmp_path, [row(i) for i in range(1, 60)])
    calls: list[int] = []
    stream(path, small_schema, progress=calls.append)
    size = path.stat().st_size
    assert len(calls) > 10 and calls == sorted(calls) and calls[-1] == size
    pcalls: list[int] = []
    ppath = parquet_file(tmp_path, good_table(30))
    stream(ppath, small_schema, progress=pcalls.append, batch_rows=4)
    assert len(pcalls) > 5 and pcalls == sorted(pcalls) and pcalls[-1] == ppath.stat().st_size


def bomb(tmp_path: Path, n: int = 400_000) -> Path:
    """A small Parquet file that decodes to ~80 MB: one long string repeated."""
    note = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(n, np.int32)), pa.array(["z" * 200])
    ).cast(pa.string())
    table = good_table(n).set_column(6, "note", note)
    path = tmp_path / "bomb.parquet"
    pq.write_table(table, path, compression="zstd", use_dictionary=False, row_group_size=n)
    return path


def test_decompression_bomb_is_rejected(
    schema_dict: SchemaDict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = DatasetSchema.from_dict(schema_dict(max_rows=1_000_000))
    path = bomb(tmp_path)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(IngestError, match=r"declares \d+ bytes of uncompressed data, more than"):
        stream(path, schema, max_plaintext_bytes=10_000_000)
    # A footer that understates the sizes is caught while streaming.
    monkeypatch.setattr(ingest, "_declared_plaintext_bytes", lambda meta, names: 0)
    seen: list[int] = []
    with pytest.raises(IngestError, match="decoded data exceeds the limit of 10000000 bytes"):
        for batch in iter_validated_batches(
            path, schema, max_plaintext_bytes=10_000_000, batch_rows=10_000
        ):
            seen.append(batch.num_rows)
    assert sum(seen) < 60_000
    assert sum(b.num_rows for b in stream(path, schema, batch_rows=100_000)) == 400_000


def test_plaintext_cap_applies_to_csv(small_schema: DatasetSchema, tmp_path: Path) -> None:
    path = csv_file(tmp_path, [row(i) for i in range(1, 100)])
    with pytest.raises(IngestError, match="decoded data exceeds the limit of 500 bytes"):
        stream(path, small_schema, max_plaintext_bytes=500)


def test_corrupt_parquet(small_schema: DatasetSchema, tmp_path: Path) -> None:
    path = parquet_file(tmp_path, good_table(40), group=10)
    raw = path.read_bytes()
    page = pq.ParquetFile(path).metadata.row_group(2).column(2).data_page_offset
    damaged = bytearray(raw)
    damaged[page : page + 64] = b"\xa5" * 64
    path.write_bytes(damaged)
    with pytest.raises(
        IngestError, match=r"corrupt Parquet file: cannot decode the data after row"
    ):
        stream(path, small_schema, batch_rows=10)
    for broken in (raw[: len(raw) // 2], raw[:-9] + b"\x00" * 9, b"PAR1" + b"\x00" * 100):
        path.write_bytes(broken)
        with pytest.raises(IngestError, match="not a readable Parquet file"):
            stream(path, small_schema)


def test_failing_ingest_leaves_no_file(small_schema: DatasetSchema, tmp_path: Path) -> None:
    """ingest -> store: a bad row near the end (after many batches were encrypted)."""
    rows = [row(i) for i in range(1, 300)]
    rows[290] = row(291, employees="-1")
    source = csv_file(tmp_path, rows)
    out = tmp_path / "store"
    out.mkdir()
    target = out / "v1.sbxenc"
    key = new_data_key()
    good = csv_file(tmp_path, [row(i) for i in range(1, 20)], name="good.csv")
    batches = iter_validated_batches(good, small_schema)
    write_encrypted_parquet(
        batches, small_schema.arrow_schema(), target, key, dataset_id="d", version=1
    )
    before = target.read_bytes()
    batches = iter_validated_batches(source, small_schema, csv_block_bytes=512, batch_rows=7)
    with pytest.raises(IngestError, match='row 291, column "employees"'):
        write_encrypted_parquet(
            batches,
            small_schema.arrow_schema(),
            target,
            key,
            dataset_id="d",
            version=1,
            row_group_rows=20,
            chunk_size=256,
        )
    assert os.listdir(out) == ["v1.sbxenc"] and target.read_bytes() == before
    # The unit check fails only after the LAST batch: still nothing left behind.
    dup = [row(i) for i in range(1, 300)] + [row(3)]
    batches = iter_validated_batches(csv_file(tmp_path, dup), small_schema, csv_block_bytes=512)
    with pytest.raises(IngestError, match="privacy unit"):
        write_encrypted_parquet(
            batches, small_schema.arrow_schema(), out / "v2.sbxenc", key, dataset_id="d", version=2
        )
    assert os.listdir(out) == ["v1.sbxenc"]


def test_ingest_to_store_round_trip(tmp_path: Path) -> None:
    table = generate_enterprises(20_000, seed=4)
    source = tmp_path / "e.csv"
    pcsv.write_csv(table, source)
    schema = enterprise_schema(20_000)
    key = new_data_key()
    batches = iter_validated_batches(source, schema, csv_block_bytes=100_000, batch_rows=3000)
    info = write_encrypted_parquet(
        batches,
        schema.arrow_schema(),
        tmp_path / "e.sbx",
        key,
        dataset_id="e",
        version=1,
        row_group_rows=8192,
    )
    assert info.row_count == 20_000
    assert load_table(tmp_path / "e.sbx", key, dataset_id="e", version=1).equals(table)


_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from sandbox.datasets.generator import enterprise_schema
    from sandbox.datasets.ingest import iter_validated_batches

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def consume(path, n):
        rows = 0
        for batch in iter_validated_batches(Path(path), enterprise_schema(n)):
            rows += batch.num_rows
        return rows

    consume(sys.argv[1], 2_500_000)  # warm up: thread pools, kernels, allocators
    before = peak()
    rows = consume(sys.argv[2], 2_500_000)
    print(json.dumps({"rows": rows, "growth": peak() - before}))
    """
)


def test_large_csv_streams_in_flat_memory(tmp_path: Path) -> None:
    """A ~150 MB CSV (2.5M rows; ~190 MB as Arrow) is ingested with peak RSS growing by
    well under 100 MB, 20 MB of which are the privacy-unit fingerprints (8 B/row)."""
    n = 2_500_000
    big = tmp_path / "big.csv"
    pcsv.write_csv(generate_enterprises(n, seed=9), big)
    assert big.stat().st_size > 140_000_000
    small = tmp_path / "small.csv"
    pcsv.write_csv(generate_enterprises(50_000, seed=9), small)
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(small), str(big)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rows"] == n
    assert report["growth"] < 100_000_000, f"peak RSS grew by {report['growth'] / 1e6:.0f} MB"
