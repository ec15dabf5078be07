"""Tests for sandbox.datasets.generator (the bundled demo dataset)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sandbox.datasets.generator import (
    CITIES,
    CITY_WEIGHTS,
    INDUSTRIES,
    enterprise_schema,
    generate_enterprises,
    write_demo_files,
)
from sandbox.datasets.ingest import read_validated
from sandbox.datasets.schema import Classification, DatasetSchema


@pytest.fixture(scope="module")
def sample() -> pa.Table:
    return generate_enterprises(200_000, seed=2026)


def test_thirteen_cities_and_industries() -> None:
    assert len(CITIES) == 13 and "Huaian" in CITIES and "Suzhou" in CITIES
    assert len(INDUSTRIES) == 8 and "information_technology" in INDUSTRIES


def test_deterministic() -> None:
    a = generate_enterprises(5000, seed=7)
    assert a.equals(generate_enterprises(5000, seed=7))
    assert not a.equals(generate_enterprises(5000, seed=8))
    assert generate_enterprises(10).equals(generate_enterprises(10, seed=2026))


def test_schema_of_generated_data(sample: pa.Table) -> None:
    schema = enterprise_schema(sample.num_rows)
    assert sample.schema == schema.arrow_schema()
    assert schema.name == "enterprises"
    assert schema.title == "Jiangsu enterprise registry (synthetic)"
    assert schema.owner_organisation == "jiangsu-data-bureau"
    assert schema.privacy_unit.id_column == "enterprise_id"
    assert schema.privacy_unit.max_rows_per_unit == 1
    assert schema.max_rows == 400_000
    assert schema.column("enterprise_id").classification is Classification.L4
    assert schema.column("annual_revenue").classification is Classification.L3
    assert schema.key_columns() == ["city", "industry"]
    assert enterprise_schema(1234).max_rows == 3000
    assert enterprise_schema(1_000_000).max_rows == 2_000_000


def test_ids_unique_and_pseudonymous(sample: pa.Table) -> None:
    ids = sample.column("enterprise_id")
    assert pc.count_distinct(ids).as_py() == sample.num_rows
    assert pc.all(pc.match_substring_regex(ids, r"^E[0-9a-f]{10}$")).as_py()
    other = generate_enterprises(1000, seed=1).column("enterprise_id")
    assert other.to_pylist() != ids.slice(0, 1000).to_pylist()


def test_city_weights(sample: pa.Table) -> None:
    counts = {d["values"]: d["counts"] for d in pc.value_counts(sample.column("city")).to_pylist()}
    assert set(counts) == set(CITIES)
    total = sum(CITY_WEIGHTS.values())
    for city, weight in CITY_WEIGHTS.items():
        assert abs(counts[city] / sample.num_rows - weight / total) < 0.01, city
    ranked = sorted(counts, key=counts.__getitem__, reverse=True)
    assert ranked[:3] == ["Suzhou", "Nanjing", "Wuxi"]


def test_bounds_and_correlations(sample: pa.Table) -> None:
    schema = enterprise_schema(sample.num_rows)
    for name in ("employees", "annual_revenue", "tax_paid", "founded_year"):
        lo, hi = schema.column(name).bounds or (0, 0)
        extremes = pc.min_max(sample.column(name)).as_py()
        assert lo <= extremes["min"] and extremes["max"] <= hi, name
    employees = sample.column("employees").to_numpy()
    revenue = sample.column("annual_revenue").to_numpy()
    tax = sample.column("tax_paid").to_numpy()
    assert np.median(employees) < np.mean(employees)  # right-skewed
    assert np.corrcoef(np.log1p(employees), np.log1p(revenue))[0, 1] > 0.5
    assert np.corrcoef(revenue, tax)[0, 1] > 0.5


def test_write_demo_files_validate(tmp_path: Path) -> None:
    data_path, schema_path = write_demo_files(tmp_path / "demo", 3000, seed=5)
    assert (data_path.name, schema_path.name) == ("enterprises.parquet", "enterprises.schema.yaml")
    assert pq.ParquetFile(data_path).metadata.row_group(0).column(0).compression == "ZSTD"
    schema = DatasetSchema.load(schema_path)
    assert schema == enterprise_schema(3000)
    table = read_validated(data_path, schema)
    assert table.equals(generate_enterprises(3000, seed=5))


def test_million_rows_fast(big_table: tuple[pa.Table, float]) -> None:
    table, elapsed = big_table
    assert table.num_rows == 1_000_000
    assert elapsed < 2.0, f"generation took {elapsed:.2f} s"


def test_rejects_non_positive_rows() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate_enterprises(0)
