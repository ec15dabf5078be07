"""Tests for sandbox.datasets.schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from sandbox.datasets.schema import (
    Classification,
    ColumnSpec,
    ColumnType,
    DatasetSchema,
    PrivacyUnit,
    SchemaError,
)

SchemaDict = Callable[..., dict[str, Any]]


def with_column(schema_dict: SchemaDict, column: dict[str, Any]) -> dict[str, Any]:
    data = schema_dict()
    data["columns"] = [*data["columns"], column]
    return data


def test_valid_schema_and_arrow_mapping(small_schema: DatasetSchema) -> None:
    assert small_schema.arrow_schema() == pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("city", pa.string(), nullable=False),
            pa.field("revenue", pa.float64(), nullable=False),
            pa.field("employees", pa.int64(), nullable=False),
            pa.field("active", pa.bool_(), nullable=False),
            pa.field("founded", pa.date32(), nullable=True),
            pa.field("note", pa.string(), nullable=True),
        ]
    )
    assert small_schema.column("revenue").bounds == (0.0, 1e9)
    assert small_schema.column("city").type is ColumnType.CATEGORY
    assert small_schema.column("id").classification is Classification.L4
    assert not small_schema.column("id").queryable
    assert small_schema.column("employees").classification is Classification.L2  # default


def test_key_columns_are_public_value_sets_not_l4(schema_dict: SchemaDict) -> None:
    data = with_column(schema_dict, {"name": "secret_flag", "type": "bool", "classification": "L4"})
    schema = DatasetSchema.from_dict(data)
    assert schema.key_columns() == ["city", "active"]


def test_column_lookup_error_is_clear(small_schema: DatasetSchema) -> None:
    with pytest.raises(KeyError, match="no column 'nope'"):
        small_schema.column("nope")


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rev\u202eenue", "bidi"),  # right-to-left override
        ("rev\u200benue", "bidi"),  # zero-width space
        ("rev\nenue", "control"),
        ("../etc", "path component"),
        ("a/b", "path component"),
        ("\uff0e\uff0e", "path component"),  # fullwidth dots become '..' under NFKC
        ("1abc", "safe identifier"),
        ("", "safe identifier"),
        ("with space", "safe identifier"),
        ("x" * 64, "safe identifier"),
        ("caf\u00e9", "safe identifier"),
    ],
)
def test_bad_column_names(schema_dict: SchemaDict, name: str, reason: str) -> None:
    data = with_column(schema_dict, {"name": name, "type": "str"})
    with pytest.raises(SchemaError, match=reason) as info:
        DatasetSchema.from_dict(data)
    assert "columns[7]" in str(info.value)


def test_name_is_nfkc_normalised() -> None:
    col = ColumnSpec(name="\uff52\uff45\uff56", type=ColumnType.STR)  # fullwidth "rev"
    assert col.name == "rev"


@pytest.mark.parametrize(
    "dup", ["Revenue", "REVENUE", "\uff52\uff45\uff56\uff45\uff4e\uff55\uff45"]
)
def test_duplicate_names_case_and_nfkc(schema_dict: SchemaDict, dup: str) -> None:
    data = with_column(schema_dict, {"name": dup, "type": "str"})
    with pytest.raises(SchemaError, match="duplicate column name"):
        DatasetSchema.from_dict(data)


def test_missing_bounds_names_the_column(schema_dict: SchemaDict) -> None:
    data = with_column(schema_dict, {"name": "profit", "type": "float"})
    with pytest.raises(SchemaError, match=r"columns\[7\] \('profit'\).*bounds .* required"):
        DatasetSchema.from_dict(data)


def test_l4_numeric_needs_no_bounds(schema_dict: SchemaDict) -> None:
    data = with_column(
        schema_dict, {"name": "internal_score", "type": "int", "classification": "L4"}
    )
    assert DatasetSchema.from_dict(data).column("internal_score").bounds is None


@pytest.mark.parametrize(
    ("column", "match"),
    [
        ({"type": "float", "bounds": [5, 1]}, "lower bound 5 is above upper bound 1"),
        ({"type": "float", "bounds": [0, float("inf")]}, "finite"),
        ({"type": "float", "bounds": [float("nan"), 1]}, "finite"),
        ({"type": "float", "bounds": [0, True]}, "not booleans"),
        ({"type": "int", "bounds": [0.5, 10]}, "must be integers"),
        ({"type": "str", "bounds": [0, 1]}, "only allowed on int/float"),
        ({"type": "category"}, "categories .* required"),
        ({"type": "category", "categories": []}, "categories .* required"),
        ({"type": "category", "categories": ["a", "b", "a"]}, r"duplicate categories \['a'\]"),
        ({"type": "str", "categories": ["a"]}, "only allowed on category"),
        ({"type": "str", "on_out_of_bounds": "clamp"}, "needs bounds"),
        ({"type": "str", "on_out_of_bounds": "drop"}, "on_out_of_bounds"),
        ({"type": "decimal"}, "type"),
        ({"type": "str", "classification": "L5"}, "classification"),
        ({"type": "str", "colour": "red"}, "colour.*Extra inputs"),
    ],
)
def test_bad_column_specs(column: dict[str, Any], match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        ColumnSpec(name="x", **column)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"name": "Bad-Name"}, "name"),
        ({"name": "../x"}, "name"),
        ({"max_rows": 0}, "max_rows"),
        ({"columns": []}, "columns"),
        ({"title": "  "}, "title"),
        ({"privacy_unit": {"id_column": "nope"}}, "'nope' is not a declared column"),
        ({"privacy_unit": {"id_column": "note"}}, "must not be nullable"),
        ({"privacy_unit": {"max_rows_per_unit": 3}}, "must be 1 when there is no id_column"),
        ({"privacy_unit": {"id_column": "id", "max_rows_per_unit": 0}}, "max_rows_per_unit"),
        ({"unexpected": 1}, "unexpected: Extra inputs"),
    ],
)
def test_bad_dataset_fields(schema_dict: SchemaDict, overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        DatasetSchema.from_dict(schema_dict(**overrides))


def test_schema_error_is_value_error_and_constructor_wraps() -> None:
    with pytest.raises(ValueError, match="invalid PrivacyUnit"):
        PrivacyUnit(max_rows_per_unit=0)


def test_models_are_frozen(small_schema: DatasetSchema) -> None:
    with pytest.raises(ValueError, match="frozen"):
        small_schema.max_rows = 5


def test_yaml_round_trip(small_schema: DatasetSchema, tmp_path: Path) -> None:
    text = small_schema.to_yaml()
    assert DatasetSchema.from_yaml(text) == small_schema
    path = tmp_path / "s.yaml"
    path.write_text(text, encoding="utf-8")
    assert DatasetSchema.load(path) == small_schema


def test_yaml_round_trip_keeps_unicode_descriptions(schema_dict: SchemaDict) -> None:
    data = with_column(
        schema_dict,
        {"name": "tax", "type": "float", "bounds": [0, 10], "description": "税额（万元）"},
    )
    schema = DatasetSchema.from_dict(data)
    assert "税额" in schema.to_yaml()
    assert DatasetSchema.from_yaml(schema.to_yaml()) == schema


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping"),
        ("a: &x [1, 2]\nb: *x\n", "aliases"),
        ("{1: 2}", "field names must be strings"),
        ("name: x\n", "title"),
    ],
)
def test_from_yaml_rejects_bad_documents(text: str, match: str) -> None:
    with pytest.raises(SchemaError, match=match):
        DatasetSchema.from_yaml(text)


def test_load_rejects_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(SchemaError, match="not valid UTF-8"):
        DatasetSchema.load(path)
