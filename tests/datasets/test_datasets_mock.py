"""Mock data from the schema alone: valid under the schema, deterministic, every group."""

from __future__ import annotations

import io
import itertools
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox.datasets.generator import CITIES, INDUSTRIES, enterprise_schema
from sandbox.datasets.ingest import read_validated
from sandbox.datasets.mock import (
    MAX_COMBINATIONS,
    generate_mock,
    mock_csv_bytes,
    mock_parquet_bytes,
    plan_mock,
)
from sandbox.datasets.schema import ColumnType, DatasetSchema

# -- strategies: valid DatasetSchema objects ------------------------------------------------

CATEGORY_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=8
)


@st.composite
def column_dicts(draw: st.DrawFn, name: str) -> dict[str, Any]:
    kind = draw(st.sampled_from([t.value for t in ColumnType]))
    level = draw(st.sampled_from(["L1", "L2", "L3", "L4"]))
    col: dict[str, Any] = {
        "name": name,
        "type": kind,
        "classification": level,
        "nullable": draw(st.booleans()),
    }
    numeric = kind in ("int", "float")
    if numeric and (level != "L4" or draw(st.booleans())):
        if kind == "int":
            low = draw(st.integers(-(10**15), 10**15))
            col["bounds"] = [low, low + draw(st.sampled_from([0, 1, 7, 1000, 10**12]))]
        else:
            start = draw(st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False))
            col["bounds"] = [start, start + draw(st.sampled_from([0.0, 1e-6, 0.5, 1.0, 1e9]))]
        if draw(st.booleans()):
            col["on_out_of_bounds"] = "clamp"
    if kind == "category":
        col["categories"] = draw(st.lists(CATEGORY_TEXT, min_size=1, max_size=4, unique=True))
    return col


@st.composite
def schemas(draw: st.DrawFn) -> DatasetSchema:
    names = draw(
        st.lists(
            st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True),
            min_size=1,
            max_size=6,
            unique_by=str.casefold,
        )
    )
    columns = [draw(column_dicts(n)) for n in names]
    unit: dict[str, Any] = {"id_column": None, "max_rows_per_unit": 1}
    if draw(st.booleans()):
        chosen = draw(st.sampled_from(columns))
        chosen["nullable"] = False
        unit = {"id_column": chosen["name"], "max_rows_per_unit": draw(st.integers(1, 4))}
    return DatasetSchema.from_dict(
        {
            "name": "mock_test",
            "title": "Mock test",
            "owner_organisation": "org",
            "privacy_unit": unit,
            "max_rows": draw(st.one_of(st.integers(1, 40), st.integers(200, 3000))),
            "columns": columns,
        }
    )


def key_sets(schema: DatasetSchema) -> dict[str, list[Any]]:
    """Public value sets of the key columns mock data must cover (the id is exempt)."""
    out: dict[str, list[Any]] = {}
    for name in schema.key_columns():
        if name == schema.privacy_unit.id_column:
            continue
        col = schema.column(name)
        out[name] = list(col.categories or []) if col.type is ColumnType.CATEGORY else [0, 1]
    return out


def covered_combinations(table: pa.Table, names: list[str]) -> set[tuple[Any, ...]]:
    columns = [table.column(n).to_pylist() for n in names]
    return {t for t in zip(*columns, strict=True) if None not in t}


def normalise(values: list[Any]) -> list[Any]:
    return [int(v) if isinstance(v, bool) else v for v in values]


def round_trip(table: pa.Table, schema: DatasetSchema, tmp_path: Path, suffix: str) -> pa.Table:
    path = tmp_path / f"mock{suffix}"
    data = mock_parquet_bytes(table) if suffix == ".parquet" else mock_csv_bytes(table)
    path.write_bytes(data)
    return read_validated(path, schema)


# -- properties ---------------------------------------------------------------------------


@settings(
    max_examples=100,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(schema=schemas(), n_rows=st.integers(1, 120), seed=st.integers(0, 2**32))
def test_mock_satisfies_its_schema_and_covers_every_group(
    schema: DatasetSchema, n_rows: int, seed: int, tmp_path: Path
) -> None:
    plan = plan_mock(schema, n_rows)
    table = generate_mock(schema, n_rows, seed)
    assert table.schema == schema.arrow_schema()
    assert table.num_rows == plan.n_rows <= schema.max_rows
    # Valid under the schema: types, bounds, categories, nulls, max_rows, rows per unit.
    assert round_trip(table, schema, tmp_path, ".parquet").equals(table)
    assert round_trip(table, schema, tmp_path, ".csv").equals(table)
    assert generate_mock(schema, n_rows, seed).equals(table)  # deterministic

    sets = key_sets(schema)
    assert list(plan.key_columns) == list(sets)
    sizes = [len(v) for v in sets.values()]
    combos = math.prod(sizes)
    n = table.num_rows
    unit = schema.privacy_unit.id_column
    id_unlimited = unit is None or (
        schema.column(unit).type is ColumnType.STR
        or (schema.column(unit).type is ColumnType.INT and schema.column(unit).bounds is None)
    )
    if combos <= min(MAX_COMBINATIONS, schema.max_rows) and id_unlimited:
        assert plan.coverage == "combinations"  # never weaker than it needs to be
    if plan.coverage == "combinations" and sets:
        assert n >= min(combos, n_rows) and n == min(max(n_rows, combos), n)
        expected = set(itertools.product(*sets.values()))
        got = {tuple(normalise(list(t))) for t in covered_combinations(table, list(sets))}
        assert got == expected
    for (name, values), size in zip(sets.items(), sizes, strict=True):
        present = set(normalise(table.column(name).drop_null().to_pylist()))
        if plan.coverage in ("combinations", "columns"):
            assert present == set(values)
        else:
            assert len(present) == min(n, size)

    for col in schema.columns:
        nulls = table.column(col.name).null_count
        if not col.nullable:
            assert nulls == 0, col.name
        elif col.name in sets:
            needed = combos if plan.coverage == "combinations" else len(sets[col.name])
            if n - needed >= 2:
                assert nulls >= 1, col.name
        elif n >= 2:
            assert 1 <= nulls < n, col.name


# -- examples -------------------------------------------------------------------------------


def test_enterprise_mock_has_every_city_industry_pair(tmp_path: Path) -> None:
    schema = enterprise_schema(1000)
    table = generate_mock(schema, n_rows=50, seed=3)
    assert table.num_rows == len(CITIES) * len(INDUSTRIES)  # grown from 50 to 104
    pairs = set(zip(table["city"].to_pylist(), table["industry"].to_pylist(), strict=True))
    assert pairs == set(itertools.product(CITIES, INDUSTRIES))
    ids = table["enterprise_id"].to_pylist()
    assert len(set(ids)) == len(ids) and all(i.startswith("mock_enterprise_id_") for i in ids)
    assert round_trip(table, schema, tmp_path, ".parquet").equals(table)
    assert generate_mock(schema, 50, seed=4) != table


def test_deterministic_and_seed_dependent(small_schema: DatasetSchema) -> None:
    a = generate_mock(small_schema, 200, seed=1)
    assert a.equals(generate_mock(small_schema, 200, seed=1))
    assert not a.equals(generate_mock(small_schema, 200, seed=2))


def wide_schema(n_keys: int, n_values: int, **extra: Any) -> DatasetSchema:
    columns = [
        {"name": f"k{i}", "type": "category", "categories": [f"v{j}" for j in range(n_values)]}
        for i in range(n_keys)
    ]
    data = {
        "name": "wide",
        "title": "Wide",
        "owner_organisation": "org",
        "privacy_unit": {"id_column": None, "max_rows_per_unit": 1},
        "max_rows": 10_000_000,
        "columns": [*columns, {"name": "x", "type": "float", "bounds": [0, 1]}],
    }
    data.update(extra)
    return DatasetSchema.from_dict(data)


def test_combinations_up_to_the_cap_grow_the_table() -> None:
    schema = wide_schema(2, 300)  # 90,000 combinations
    plan = plan_mock(schema, 1000)
    assert plan.coverage == "combinations" and plan.n_rows == 90_000
    table = generate_mock(schema, 1000)
    assert len(covered_combinations(table, ["k0", "k1"])) == 90_000


def test_beyond_the_cap_each_column_is_covered() -> None:
    schema = wide_schema(3, 50)  # 125,000 combinations > MAX_COMBINATIONS
    plan = plan_mock(schema, 1000)
    assert plan.coverage == "columns" and plan.n_rows == 1000
    table = generate_mock(schema, 1000)
    for name in ("k0", "k1", "k2"):
        assert set(table[name].to_pylist()) == {f"v{j}" for j in range(50)}
    huge = wide_schema(1, 150_000)  # one key wider than the cap: bounded output
    plan = plan_mock(huge, 1000)
    assert plan.coverage == "partial" and plan.n_rows == MAX_COMBINATIONS
    assert len(generate_mock(huge, 1000)["k0"].unique()) == MAX_COMBINATIONS


def test_max_rows_and_id_capacity_bound_the_rows(tmp_path: Path) -> None:
    schema = wide_schema(2, 10, max_rows=30)  # 100 combinations do not fit in 30 rows
    plan = plan_mock(schema, 5)
    assert plan.coverage == "columns" and plan.n_rows == 10
    data: dict[str, Any] = {
        "name": "ids",
        "title": "Bounded ids",
        "owner_organisation": "org",
        "privacy_unit": {"id_column": "uid", "max_rows_per_unit": 2},
        "max_rows": 1000,
        "columns": [
            {"name": "uid", "type": "int", "bounds": [5, 14], "classification": "L4"},
            {"name": "flag", "type": "bool", "nullable": True},
        ],
    }
    schema = DatasetSchema.from_dict(data)
    table = generate_mock(schema, 500)
    assert table.num_rows == 20  # 10 ids x 2 rows each
    assert sorted(set(table["uid"].to_pylist())) == list(range(5, 15))
    assert round_trip(table, schema, tmp_path, ".csv").equals(table)


def test_download_helpers(small_schema: DatasetSchema) -> None:
    table = generate_mock(small_schema, 30)
    csv_bytes = mock_csv_bytes(table)
    assert csv_bytes.startswith(b'"id","city","revenue","employees","active","founded","note"\n')
    assert pcsv.read_csv(io.BytesIO(csv_bytes)).num_rows == 30
    parquet = mock_parquet_bytes(table)
    assert parquet[:4] == b"PAR1"
    assert pq.read_table(pa.BufferReader(parquet)).equals(table)


def test_bad_arguments(small_schema: DatasetSchema) -> None:
    with pytest.raises(ValueError, match="n_rows"):
        generate_mock(small_schema, 0)
    with pytest.raises(ValueError, match="seed"):
        generate_mock(small_schema, 10, seed=-1)
