"""Fixtures for the datasets tests: a small schema, CSV helpers, a large demo table."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sandbox.datasets.generator import generate_enterprises
from sandbox.datasets.schema import DatasetSchema

HEADER = "id,city,revenue,employees,active,founded,note"
GOOD_ROWS = [
    "a1,Nanjing,100.5,10,true,2001-02-03,hello",
    "a2,Suzhou,0,0,false,,",
    'a3,Wuxi,1000000000,5000,true,2020-12-31,"quoted, comma"',
]


def small_schema_dict(**overrides: Any) -> dict[str, Any]:
    """A plain-dict schema exercising every column type; ``overrides`` replace top-level keys."""
    data: dict[str, Any] = {
        "name": "firms",
        "title": "Test firms",
        "owner_organisation": "test-org",
        "privacy_unit": {"id_column": "id", "max_rows_per_unit": 1},
        "max_rows": 1000,
        "columns": [
            {"name": "id", "type": "str", "classification": "L4"},
            {
                "name": "city",
                "type": "category",
                "categories": ["Nanjing", "Suzhou", "Wuxi"],
                "classification": "L1",
            },
            {"name": "revenue", "type": "float", "bounds": [0, 1e9], "classification": "L3"},
            {"name": "employees", "type": "int", "bounds": [0, 5000]},
            {"name": "active", "type": "bool"},
            {"name": "founded", "type": "date", "nullable": True},
            {"name": "note", "type": "str", "nullable": True},
        ],
    }
    data.update(overrides)
    return data


@pytest.fixture
def schema_dict() -> Callable[..., dict[str, Any]]:
    """Factory: ``schema_dict(**overrides)`` returns a fresh small schema as a plain dict."""
    return small_schema_dict


@pytest.fixture
def small_schema() -> DatasetSchema:
    return DatasetSchema.from_dict(small_schema_dict())


@pytest.fixture
def write_csv(tmp_path: Path) -> Callable[..., Path]:
    """Write ``lines`` (header first) as a CSV file and return its path."""

    def _write(lines: list[str], name: str = "data.csv", raw: bytes | None = None) -> Path:
        path = tmp_path / name
        path.write_bytes(raw if raw is not None else ("\n".join(lines) + "\n").encode("utf-8"))
        return path

    return _write


@pytest.fixture(scope="session")
def big_table() -> tuple[pa.Table, float]:
    """One million demo rows (generated once per session) and the generation time in s."""
    start = time.perf_counter()
    table = generate_enterprises(1_000_000, seed=2026)
    return table, time.perf_counter() - start
