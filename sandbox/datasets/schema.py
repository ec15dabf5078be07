"""Declared dataset schemas: columns, types, bounds, classification, privacy unit.

Everything in a :class:`DatasetSchema` is *public*: it is written by the data owner,
shown to analysts and used by the privacy engine.  Bounds and category sets come from
the owner, never from the data (design §2, §5).

All models are frozen pydantic v2 models with ``extra="forbid"``.  Constructing a model
with bad input raises :class:`SchemaError` (a ``ValueError``) whose message names the
offending field and, for column errors, the column.
"""

from __future__ import annotations

import enum
import math
import re
import unicodedata
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandbox.yamltext import too_deep

__all__ = [
    "Classification",
    "ColumnSpec",
    "ColumnType",
    "DatasetSchema",
    "PrivacyUnit",
    "SchemaError",
]

_COLUMN_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_DATASET_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
#: Largest schema YAML accepted by :meth:`DatasetSchema.from_yaml` (bytes of UTF-8).
MAX_SCHEMA_YAML_BYTES = 1 << 20


class SchemaError(ValueError):
    """A dataset schema is invalid; the message names the field or column."""


class Classification(enum.StrEnum):
    """Sensitivity level of a column; the policy maps levels to treatment."""

    L1 = "L1"  #: public
    L2 = "L2"  #: internal
    L3 = "L3"  #: sensitive
    L4 = "L4"  #: core: never queryable

    @property
    def queryable(self) -> bool:
        """False only for L4 (core) columns, which no query may touch."""
        return self is not Classification.L4


class ColumnType(enum.StrEnum):
    """Logical column type; see :meth:`DatasetSchema.arrow_schema` for the Arrow mapping."""

    INT = "int"
    FLOAT = "float"
    STR = "str"
    BOOL = "bool"
    DATE = "date"
    CATEGORY = "category"

    @property
    def is_numeric(self) -> bool:
        return self in (ColumnType.INT, ColumnType.FLOAT)


_ARROW_TYPES: dict[ColumnType, pa.DataType] = {
    ColumnType.INT: pa.int64(),
    ColumnType.FLOAT: pa.float64(),
    ColumnType.STR: pa.string(),
    ColumnType.BOOL: pa.bool_(),
    ColumnType.DATE: pa.date32(),
    ColumnType.CATEGORY: pa.string(),
}


_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _has_unsafe_chars(text: str) -> bool:
    """True if ``text`` holds control, format (incl. bidi and zero-width), private-use,
    unassigned or line/paragraph separator characters."""
    return any(unicodedata.category(ch) in _UNSAFE_CATEGORIES for ch in text)


def normalise_name(raw: str) -> str:
    """Return the canonical (NFKC) form of a column name or raise ``ValueError``.

    Contract: the result matches ``^[A-Za-z_][A-Za-z0-9_]{0,62}$``.  Control and bidi
    characters, ``..`` and ``/`` are rejected with a specific message.
    """
    if _has_unsafe_chars(raw):
        raise ValueError(f"name {raw!r} contains control, bidi or other invisible characters")
    name = unicodedata.normalize("NFKC", raw)
    if ".." in name or "/" in name or "\\" in name:
        raise ValueError(f"name {raw!r} contains a path component ('..', '/' or '\\')")
    if not _COLUMN_NAME_RE.fullmatch(name):
        raise ValueError(
            f"name {raw!r} is not a safe identifier (letters, digits and '_', "
            "not starting with a digit, at most 63 characters)"
        )
    return name


class _Frozen(BaseModel):
    """Base: frozen, no extra fields, and :class:`SchemaError` instead of ValidationError."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise SchemaError(_format_validation_error(exc, data, type(self).__name__)) from None


def _format_validation_error(exc: ValidationError, data: Any, what: str) -> str:
    """Render a pydantic error as one readable line per problem, naming columns by name."""
    lines = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = list(err["loc"])
        parts: list[str] = []
        node: Any = data
        for item in loc:
            if isinstance(item, int) and parts:
                col_name = None
                if (
                    isinstance(node, list)
                    and 0 <= item < len(node)
                    and isinstance(node[item], Mapping)
                ):
                    col_name = node[item].get("name")
                parts[-1] += f"[{item}]" + (f" ({col_name!r})" if isinstance(col_name, str) else "")
            else:
                parts.append(str(item))
            if isinstance(node, Mapping):
                node = node.get(item)
            elif isinstance(node, list) and isinstance(item, int) and 0 <= item < len(node):
                node = node[item]
            else:
                node = None
        msg = str(err["msg"]).removeprefix("Value error, ")
        # A nested model re-raises through its own __init__: drop its "invalid X: " prefix.
        msg = re.sub(r"^invalid [A-Za-z]+: ", "", msg)
        where = ".".join(parts)
        lines.append(f"{where}: {msg}" if where else msg)
    return f"invalid {what}: " + "; ".join(lines)


class ColumnSpec(_Frozen):
    """One declared column.

    Contracts enforced at construction:
    * ``name`` is stored in NFKC form and is a safe identifier;
    * ``bounds`` are required for int/float columns that are not L4, must be finite with
      ``lower <= upper`` (integral for int columns) and are only allowed on numeric columns;
    * ``categories`` are required for (and only allowed on) ``category`` columns: a
      non-empty list of unique strings, the public value set;
    * ``on_out_of_bounds="clamp"`` is only allowed on columns with bounds.
    """

    name: str
    type: ColumnType
    nullable: bool = Field(default=False, strict=True)
    bounds: tuple[float, float] | None = None
    categories: list[str] | None = None
    classification: Classification = Classification.L2
    description: str = ""
    on_out_of_bounds: Literal["reject", "clamp"] = "reject"

    @field_validator("name", mode="before")
    @classmethod
    def _check_name(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("column name must be a string")
        return normalise_name(value)

    @field_validator("bounds", mode="before")
    @classmethod
    def _no_bool_bounds(cls, value: Any) -> Any:
        if isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value):
            raise ValueError("bounds must be numbers, not booleans")
        return value

    @model_validator(mode="after")
    def _check_column(self) -> ColumnSpec:
        col, kind = self.name, self.type.value
        if self.bounds is not None:
            lo, hi = self.bounds
            if not self.type.is_numeric:
                raise ValueError(
                    f"column {col!r}: bounds are only allowed on int/float columns, not {kind}"
                )
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"column {col!r}: bounds must be finite, got {self.bounds}")
            if lo > hi:
                raise ValueError(f"column {col!r}: lower bound {lo:g} is above upper bound {hi:g}")
            if self.type is ColumnType.INT and not (
                float(lo).is_integer() and float(hi).is_integer()
            ):
                raise ValueError(f"column {col!r}: bounds of an int column must be integers")
        elif self.type.is_numeric and self.classification is not Classification.L4:
            raise ValueError(
                f"column {col!r}: bounds [lower, upper] are required for {kind} columns "
                "(bounds come from the owner, never from the data)"
            )
        if self.type is ColumnType.CATEGORY:
            if not self.categories:
                raise ValueError(f"column {col!r}: categories (the public value set) are required")
            if len(set(self.categories)) != len(self.categories):
                dups = sorted({c for c in self.categories if self.categories.count(c) > 1})
                raise ValueError(f"column {col!r}: duplicate categories {dups}")
        elif self.categories is not None:
            raise ValueError(f"column {col!r}: categories are only allowed on category columns")
        if self.on_out_of_bounds == "clamp" and self.bounds is None:
            raise ValueError(f"column {col!r}: on_out_of_bounds='clamp' needs bounds")
        return self

    @property
    def queryable(self) -> bool:
        """False for L4 columns."""
        return self.classification.queryable

    @property
    def arrow_type(self) -> pa.DataType:
        """The Arrow type this column is stored as."""
        return _ARROW_TYPES[self.type]


class PrivacyUnit(_Frozen):
    """Who is protected: one row per person (``id_column=None``) or an id column whose
    value identifies the person, each contributing at most ``max_rows_per_unit`` rows."""

    id_column: str | None = None
    max_rows_per_unit: int = Field(default=1, ge=1, strict=True)

    @field_validator("id_column", mode="before")
    @classmethod
    def _check_id(cls, value: Any) -> Any:
        return normalise_name(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_unit(self) -> PrivacyUnit:
        if self.id_column is None and self.max_rows_per_unit != 1:
            raise ValueError(
                "max_rows_per_unit must be 1 when there is no id_column (one row per person)"
            )
        return self


class DatasetSchema(_Frozen):
    """A dataset's public declaration.

    Contracts: ``name`` is a lowercase slug; ``columns`` is non-empty with names unique
    case-insensitively (after NFKC); ``privacy_unit.id_column``, if set, names a
    non-nullable column; ``max_rows`` is a public upper bound on the row count.
    """

    name: str = Field(pattern=_DATASET_NAME_RE.pattern)
    title: str = Field(min_length=1, max_length=200)
    description: str = ""
    owner_organisation: str = Field(min_length=1, max_length=200)
    privacy_unit: PrivacyUnit
    max_rows: int = Field(gt=0, strict=True)
    row_count_public: bool = Field(default=False, strict=True)
    columns: list[ColumnSpec] = Field(min_length=1)

    @field_validator("title", "owner_organisation")
    @classmethod
    def _printable(cls, value: str) -> str:
        if _has_unsafe_chars(value) or not value.strip():
            raise ValueError("must be non-blank and free of control or bidi characters")
        return value

    @model_validator(mode="after")
    def _check_dataset(self) -> DatasetSchema:
        seen: dict[str, str] = {}
        for col in self.columns:
            key = col.name.casefold()
            if key in seen:
                raise ValueError(
                    f"duplicate column name {col.name!r} "
                    f"(clashes with {seen[key]!r}, ignoring case)"
                )
            seen[key] = col.name
        unit = self.privacy_unit
        if unit.id_column is not None:
            if unit.id_column not in {c.name for c in self.columns}:
                raise ValueError(
                    f"privacy_unit.id_column {unit.id_column!r} is not a declared column"
                )
            if self.column(unit.id_column).nullable:
                raise ValueError(f"privacy_unit.id_column {unit.id_column!r} must not be nullable")
        return self

    # -- helpers -----------------------------------------------------------------

    def column(self, name: str) -> ColumnSpec:
        """Return the column called ``name`` (exact, canonical name) or raise ``KeyError``."""
        for col in self.columns:
            if col.name == name:
                return col
        names = [c.name for c in self.columns]
        raise KeyError(f"dataset {self.name!r} has no column {name!r}; columns: {names}")

    def key_columns(self) -> list[str]:
        """Group-by key candidates: category/bool columns (public value set), not L4."""
        return [
            c.name
            for c in self.columns
            if c.queryable and c.type in (ColumnType.CATEGORY, ColumnType.BOOL)
        ]

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of validated/stored data (column order as declared)."""
        return pa.schema(
            [pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in self.columns]
        )

    # -- (de)serialisation -----------------------------------------------------------

    def to_yaml(self) -> str:
        """Serialise to YAML; ``from_yaml(s.to_yaml()) == s``."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)

    @classmethod
    def from_dict(cls, data: Any) -> DatasetSchema:
        """Validate a plain mapping (e.g. parsed JSON/YAML); raise :class:`SchemaError`."""
        if not isinstance(data, Mapping):
            raise SchemaError(
                f"invalid DatasetSchema: expected a mapping, got {type(data).__name__}"
            )
        bad_keys = [k for k in data if not isinstance(k, str)]
        if bad_keys:
            raise SchemaError(
                f"invalid DatasetSchema: field names must be strings, got {bad_keys[:3]!r}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise SchemaError(_format_validation_error(exc, data, cls.__name__)) from None

    @classmethod
    def from_yaml(cls, text: str) -> DatasetSchema:
        """Parse YAML text (safe loader, no aliases, at most 1 MiB); raise :class:`SchemaError`."""
        if len(text.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_YAML_BYTES:
            raise SchemaError(f"schema YAML is larger than {MAX_SCHEMA_YAML_BYTES} bytes")
        if too_deep(text):
            raise SchemaError("schema YAML is nested too deeply")
        try:
            for event in yaml.parse(text, Loader=yaml.SafeLoader):
                if isinstance(event, yaml.AliasEvent):
                    raise SchemaError("schema YAML must not use aliases (*ref)")
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SchemaError(f"schema is not valid YAML: {exc}") from None
        except SchemaError:
            raise
        except (ValueError, OverflowError, RecursionError) as exc:  # dates, huge ints, depth
            raise SchemaError(f"schema YAML has a value that cannot be read: "
                              f"{type(exc).__name__}") from None
        try:
            return cls.from_dict(data)
        except RecursionError:
            raise SchemaError("schema YAML is nested too deeply") from None

    @classmethod
    def load(cls, path: str | Path) -> DatasetSchema:
        """Read a schema YAML file (UTF-8); ``OSError`` propagates, bad content -> SchemaError."""
        raw = Path(path).read_bytes()
        if len(raw) > MAX_SCHEMA_YAML_BYTES:
            raise SchemaError(
                f"schema file {str(path)!r} is larger than {MAX_SCHEMA_YAML_BYTES} bytes"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SchemaError(f"schema file {str(path)!r} is not valid UTF-8") from None
        return cls.from_yaml(text)
