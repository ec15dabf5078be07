"""Tests for sandbox.datasets.ingest.read_validated."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from sandbox.datasets.generator import enterprise_schema
from sandbox.datasets.ingest import IngestError, read_validated
from sandbox.datasets.schema import DatasetSchema

WriteCsv = Callable[..., Path]
SchemaDict = Callable[..., dict[str, Any]]

HEADER = "id,city,revenue,employees,active,founded,note"
GOOD = [
    "a1,Nanjing,100.5,10,true,2001-02-03,hello",
    "a2,Suzhou,0,0,false,,",
    'a3,Wuxi,1000000000,5000,true,2020-12-31,"quoted, comma"',
]


def replace_row(index: int, row: str) -> list[str]:
    """GOOD rows with data row ``index`` (1-based) replaced, header first."""
    rows = list(GOOD)
    rows[index - 1] = row
    return [HEADER, *rows]


def test_good_csv(small_schema: DatasetSchema, write_csv: WriteCsv) -> None:
    table = read_validated(write_csv([HEADER, *GOOD]), small_schema)
    assert table.schema == small_schema.arrow_schema()
    assert table.num_rows == 3
    first, second, third = table.to_pylist()
    assert first == {
        "id": "a1",
        "city": "Nanjing",
        "revenue": 100.5,
        "employees": 10,
        "active": True,
        "founded": dt.date(2001, 2, 3),
        "note": "hello",
    }
    assert second["founded"] is None and second["note"] is None  # empty field = null
    assert third["note"] == "quoted, comma"


def test_column_order_in_file_does_not_matter(
    small_schema: DatasetSchema, write_csv: WriteCsv
) -> None:
    lines = ["note,id,city,revenue,employees,active,founded", "x,a1,Wuxi,1.5,3,false,2000-01-01"]
    table = read_validated(write_csv(lines), small_schema)
    assert table.column_names == [c.name for c in small_schema.columns]


def test_good_parquet_with_coercible_types(small_schema: DatasetSchema, tmp_path: Path) -> None:
    source = pa.table(
        {
            "id": pa.array(["a1", "a2"]),
            "city": pa.array(["Nanjing", "Wuxi"]).dictionary_encode(),
            "revenue": pa.array([1, 2], pa.int32()),
            "employees": pa.array([3, 4], pa.int16()),
            "active": [True, False],
            "founded": pa.array([dt.date(2000, 1, 1), None], pa.date32()),
            "note": pa.array(["n", None], pa.large_string()),
        }
    )
    for suffix in (".parquet", ".pq"):
        path = tmp_path / f"d{suffix}"
        pq.write_table(source, path)
        table = read_validated(path, small_schema)
        assert table.schema == small_schema.arrow_schema()
        assert table.column("revenue").to_pylist() == [1.0, 2.0]
        assert table.column("city").to_pylist() == ["Nanjing", "Wuxi"]


def test_parquet_wrong_type_is_rejected(small_schema: DatasetSchema, tmp_path: Path) -> None:
    source = pa.table(
        {
            "id": ["a"],
            "city": ["Wuxi"],
            "revenue": [1.0],
            "employees": ["3"],
            "active": [True],
            "founded": [None],
            "note": [None],
        }
    )
    path = tmp_path / "d.parquet"
    pq.write_table(source, path)
    with pytest.raises(
        IngestError, match='column "employees": expected int, found Parquet type string'
    ):
        read_validated(path, small_schema)


def test_parquet_out_of_bounds_names_row(small_schema: DatasetSchema, tmp_path: Path) -> None:
    source = pa.table(
        {
            "id": ["a", "b"],
            "city": ["Wuxi", "Wuxi"],
            "revenue": [1.0, 2.0],
            "employees": [3, 9999],
            "active": [True, True],
            "founded": pa.array([None, None], pa.date32()),
            "note": pa.array([None, None], pa.string()),
        }
    )
    path = tmp_path / "d.parquet"
    pq.write_table(source, path)
    with pytest.raises(
        IngestError, match='row 2, column "employees": value 9999 is above the upper bound 5000'
    ):
        read_validated(path, small_schema)


def test_not_a_parquet_file(small_schema: DatasetSchema, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(IngestError, match="not a readable Parquet file"):
        read_validated(path, small_schema)


@pytest.mark.parametrize(
    ("index", "row", "message"),
    [
        (
            3,
            "a3,Wuxi,5e9,1,true,,",
            'row 3, column "revenue": value 5000000000 is above the upper bound 1000000000',
        ),
        (
            2,
            "a2,Wuxi,1,-4,true,,",
            'row 2, column "employees": value -4 is below the lower bound 0',
        ),
        (2, "a2,Beijing,1,1,true,,", "row 2, column \"city\": unknown category 'Beijing'"),
        (
            1,
            "a1,,1,1,true,,",
            'row 1, column "city": missing value \\(null\\) in a non-nullable column',
        ),
        (2, "a2,Wuxi,,1,true,,", 'row 2, column "revenue": missing value'),
        (3, "a3,Wuxi,nan,1,true,,", 'row 3, column "revenue": value nan is not a finite number'),
        (2, "a2,Wuxi,1,abc,true,,", "row 2, column \"employees\": cannot parse 'abc' as int"),
        (3, "a3,Wuxi,1,1,maybe,,", "row 3, column \"active\": cannot parse 'maybe' as bool"),
        (
            2,
            "a2,Wuxi,1,1,true,2020-13-45,",
            "row 2, column \"founded\": cannot parse '2020-13-45' as date",
        ),
        (
            2,
            "a1,Wuxi,1,1,true,,",
            'row 1, column "id": a privacy unit has up to 2 rows, more than max_rows_per_unit = 1',
        ),
    ],
)
def test_csv_rejections_name_row_and_column(
    small_schema: DatasetSchema, write_csv: WriteCsv, index: int, row: str, message: str
) -> None:
    with pytest.raises(IngestError, match=message):
        read_validated(write_csv(replace_row(index, row)), small_schema)


def test_l4_values_are_not_echoed(schema_dict: SchemaDict, write_csv: WriteCsv) -> None:
    data = schema_dict()
    data["columns"] = [*data["columns"], {"name": "secret", "type": "int", "classification": "L4"}]
    schema = DatasetSchema.from_dict(data)
    lines = [HEADER + ",secret", GOOD[0] + ",12", GOOD[1] + ",topsecretvalue"]
    with pytest.raises(
        IngestError, match=r'row 2, column "secret": cannot parse \(value hidden'
    ) as info:
        read_validated(write_csv(lines), schema)
    assert "topsecretvalue" not in str(info.value)


def test_missing_and_unexpected_columns(small_schema: DatasetSchema, write_csv: WriteCsv) -> None:
    lines = ["id,city,revenue,employees,active,note,extra", "a1,Wuxi,1,1,true,,x"]
    with pytest.raises(
        IngestError, match='missing columns: "founded"; unexpected columns: "extra"'
    ):
        read_validated(write_csv(lines), small_schema)


def test_duplicate_header_column(small_schema: DatasetSchema, write_csv: WriteCsv) -> None:
    with pytest.raises(IngestError, match='duplicate columns: "id"'):
        read_validated(write_csv([HEADER + ",id", GOOD[0] + ",x"]), small_schema)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a2,Wuxi,1,1,true", r"row 2 \(line 3\): expected 7 columns, got 5"),
        ("a2,Wuxi,1,1,true,,,extra", r"row 2 \(line 3\): expected 7 columns, got 8"),
    ],
)
def test_ragged_rows(
    small_schema: DatasetSchema, write_csv: WriteCsv, row: str, message: str
) -> None:
    with pytest.raises(IngestError, match=message):
        read_validated(write_csv(replace_row(2, row)), small_schema)


def test_nul_byte_is_rejected(small_schema: DatasetSchema, write_csv: WriteCsv) -> None:
    raw = ("\n".join([HEADER, GOOD[0], "a2,Wu\0xi,1,1,true,,"]) + "\n").encode()
    with pytest.raises(IngestError, match="NUL byte at line 3"):
        read_validated(write_csv([], raw=raw), small_schema)


def test_bom_is_rejected(small_schema: DatasetSchema, write_csv: WriteCsv) -> None:
    raw = b"\xef\xbb\xbf" + ("\n".join([HEADER, *GOOD]) + "\n").encode()
    with pytest.raises(IngestError, match="byte order mark"):
        read_validated(write_csv([], raw=raw), small_schema)


def test_crlf_line_endings_are_accepted(small_schema: DatasetSchema, write_csv: WriteCsv) -> None:
    raw = ("\r\n".join([HEADER, *GOOD]) + "\r\n").encode()
    assert read_validated(write_csv([], raw=raw), small_schema).num_rows == 3


def test_clamp_mode(schema_dict: SchemaDict, write_csv: WriteCsv) -> None:
    data = schema_dict()
    for col in data["columns"]:
        if col["name"] in ("revenue", "employees"):
            col["on_out_of_bounds"] = "clamp"
        if col["name"] == "revenue":
            col["nullable"] = True
    schema = DatasetSchema.from_dict(data)
    lines = [HEADER, "a1,Wuxi,-5,7000,true,,", "a2,Wuxi,2e9,-1,true,,", "a3,Wuxi,,12,true,,"]
    table = read_validated(write_csv(lines), schema)
    assert table.column("revenue").to_pylist() == [0.0, 1e9, None]
    assert table.column("employees").to_pylist() == [5000, 0, 12]
    assert table.schema == schema.arrow_schema()


def test_quoted_empty_string_is_not_null(small_schema: DatasetSchema, write_csv: WriteCsv) -> None:
    table = read_validated(write_csv([HEADER, 'a1,Wuxi,1,1,true,,""']), small_schema)
    assert table.column("note").to_pylist() == [""]


def test_max_bytes_checked_before_reading(small_schema: DatasetSchema, write_csv: WriteCsv) -> None:
    path = write_csv([HEADER, *GOOD])
    with pytest.raises(IngestError, match="larger than the limit of 10 bytes"):
        read_validated(path, small_schema, max_bytes=10)
    assert read_validated(path, small_schema, max_bytes=path.stat().st_size).num_rows == 3


def test_max_rows_enforced(schema_dict: SchemaDict, write_csv: WriteCsv) -> None:
    schema = DatasetSchema.from_dict(schema_dict(max_rows=2))
    with pytest.raises(IngestError, match="3 rows, more than the declared max_rows 2"):
        read_validated(write_csv([HEADER, *GOOD]), schema)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("data.xlsx", b"x", "unsupported file type"),
        ("data.csv", HEADER.encode() + b"\n", "no data rows"),
        ("data.csv", b"", "first line must be the header"),
        ("data.csv", b"\n" + HEADER.encode(), "first line must be the header"),
    ],
)
def test_other_bad_files(
    small_schema: DatasetSchema, write_csv: WriteCsv, name: str, content: bytes, message: str
) -> None:
    with pytest.raises(IngestError, match=message):
        read_validated(write_csv([], name=name, raw=content), small_schema)


def test_missing_file(small_schema: DatasetSchema, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="cannot read file"):
        read_validated(tmp_path / "absent.csv", small_schema)


def test_million_rows_csv_is_fast(big_table: tuple[pa.Table, float], tmp_path: Path) -> None:
    table, _ = big_table
    path = tmp_path / "enterprises.csv"
    pcsv.write_csv(table, path)
    start = time.perf_counter()
    result = read_validated(path, enterprise_schema(table.num_rows))
    elapsed = time.perf_counter() - start
    assert result.equals(table)
    assert elapsed < 5.0, f"ingest of 1M rows took {elapsed:.2f} s"
