"""Deterministic generator of the bundled demo dataset: a synthetic enterprise registry
of Jiangsu's 13 prefecture-level cities.

The data is synthetic but shaped like the real thing: city sizes weighted towards
Suzhou, Nanjing and Wuxi, a skewed (log-normal) firm size distribution, revenue that
grows with headcount and depends on the industry, tax that tracks revenue.  Everything
is vectorised with numpy; the same ``(n_rows, seed)`` always gives the same table.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sandbox.datasets.schema import (
    Classification,
    ColumnSpec,
    ColumnType,
    DatasetSchema,
    PrivacyUnit,
)

__all__ = [
    "CITIES",
    "CITY_WEIGHTS",
    "INDUSTRIES",
    "enterprise_schema",
    "generate_enterprises",
    "write_demo_files",
]

#: City -> relative weight (roughly each city's share of registered enterprises).
CITY_WEIGHTS: dict[str, float] = {
    "Nanjing": 0.140,
    "Wuxi": 0.105,
    "Xuzhou": 0.070,
    "Changzhou": 0.080,
    "Suzhou": 0.200,
    "Nantong": 0.075,
    "Lianyungang": 0.035,
    "Huaian": 0.040,
    "Yancheng": 0.060,
    "Yangzhou": 0.050,
    "Zhenjiang": 0.040,
    "Taizhou": 0.055,
    "Suqian": 0.050,
}
CITIES: tuple[str, ...] = tuple(CITY_WEIGHTS)

#: industry -> (share, log-median headcount, revenue per employee in 10k CNY, tax rate)
_INDUSTRY_PARAMS: dict[str, tuple[float, float, float, float]] = {
    "manufacturing": (0.22, 3.0, 60.0, 0.055),
    "wholesale_retail": (0.28, 1.8, 80.0, 0.030),
    "construction": (0.09, 2.9, 50.0, 0.040),
    "information_technology": (0.10, 2.6, 70.0, 0.060),
    "finance": (0.04, 2.8, 150.0, 0.090),
    "logistics": (0.08, 2.3, 45.0, 0.040),
    "hospitality": (0.09, 2.0, 20.0, 0.035),
    "agriculture": (0.10, 1.6, 25.0, 0.015),
}
INDUSTRIES: tuple[str, ...] = tuple(_INDUSTRY_PARAMS)

_MAX_EMPLOYEES = 5000
_MAX_REVENUE = 100_000.0
_MAX_TAX = 10_000.0
_FIRST_YEAR, _LAST_YEAR = 1950, 2025
_MASK40 = (1 << 40) - 1


def enterprise_schema(n_rows: int) -> DatasetSchema:
    """The declared schema of the demo dataset; ``max_rows`` is ``2 * n_rows`` rounded
    up to one significant digit (a public upper bound that does not reveal ``n_rows``)."""
    if n_rows < 1:
        raise ValueError("n_rows must be at least 1")
    bound = 2 * n_rows
    unit = 10 ** (len(str(bound)) - 1)
    max_rows = -(-bound // unit) * unit
    L1, L2, L3, L4 = Classification.L1, Classification.L2, Classification.L3, Classification.L4
    columns = [
        ColumnSpec(
            name="enterprise_id",
            type=ColumnType.STR,
            classification=L4,
            description="Pseudonymous enterprise identifier (privacy unit); never queryable.",
        ),
        ColumnSpec(
            name="city",
            type=ColumnType.CATEGORY,
            categories=list(CITIES),
            classification=L1,
            description="Prefecture-level city of registration.",
        ),
        ColumnSpec(
            name="industry",
            type=ColumnType.CATEGORY,
            categories=list(INDUSTRIES),
            classification=L1,
            description="Industry sector.",
        ),
        ColumnSpec(
            name="employees",
            type=ColumnType.INT,
            bounds=(0, _MAX_EMPLOYEES),
            classification=L2,
            description="Number of employees.",
        ),
        ColumnSpec(
            name="annual_revenue",
            type=ColumnType.FLOAT,
            bounds=(0.0, _MAX_REVENUE),
            classification=L3,
            description="Annual revenue in 10k CNY (万元).",
        ),
        ColumnSpec(
            name="tax_paid",
            type=ColumnType.FLOAT,
            bounds=(0.0, _MAX_TAX),
            classification=L3,
            description="Tax paid in the year, in 10k CNY (万元).",
        ),
        ColumnSpec(
            name="founded_year",
            type=ColumnType.INT,
            bounds=(_FIRST_YEAR, _LAST_YEAR),
            classification=L2,
            description="Year of founding.",
        ),
    ]
    return DatasetSchema(
        name="enterprises",
        title="Jiangsu enterprise registry (synthetic)",
        description="Synthetic registry of enterprises in Jiangsu's 13 prefecture-level cities.",
        owner_organisation="jiangsu-data-bureau",
        privacy_unit=PrivacyUnit(id_column="enterprise_id", max_rows_per_unit=1),
        max_rows=max_rows,
        columns=columns,
    )


def _pseudonymous_ids(n_rows: int, seed: int) -> pa.Array:
    """``"E" + 10 hex chars`` per row: a seeded bijection on 40-bit integers applied to the
    row index (xor-shift / odd-multiply rounds are invertible mod 2**40), so ids are
    unique by construction and look random."""
    material = hashlib.sha256(f"sandbox-enterprise-ids:{seed}".encode()).digest()
    keys = [int.from_bytes(material[i : i + 8], "big") for i in range(0, 32, 8)]
    x = np.arange(n_rows, dtype=np.uint64)
    mask = np.uint64(_MASK40)
    x = (x ^ np.uint64(keys[0] & _MASK40)) & mask
    for k in keys[1:]:
        x = (x * np.uint64((k & _MASK40) | 1)) & mask
        x ^= x >> np.uint64(19)
        x = (x + np.uint64(k >> 24 & _MASK40)) & mask
    shifts = np.arange(36, -1, -4, dtype=np.uint64)
    nibbles = ((x[:, None] >> shifts) & np.uint64(0xF)).astype(np.uint8)
    chars = np.empty((n_rows, 11), dtype=np.uint8)
    chars[:, 0] = ord("E")
    chars[:, 1:] = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
    offsets = np.arange(0, 11 * (n_rows + 1), 11, dtype=np.int32)
    return pa.StringArray.from_buffers(
        n_rows, pa.py_buffer(offsets), pa.py_buffer(chars.reshape(-1))
    )


def _pick(names: tuple[str, ...], codes: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names)).cast(
        pa.string()
    )


def generate_enterprises(n_rows: int, seed: int = 2026) -> pa.Table:
    """Generate ``n_rows`` synthetic enterprises; deterministic in ``(n_rows, seed)``.

    The result has exactly ``enterprise_schema(n_rows).arrow_schema()`` and passes
    :func:`sandbox.datasets.ingest.read_validated` against that schema.
    """
    if n_rows < 1:
        raise ValueError("n_rows must be at least 1")
    rng = np.random.default_rng(seed)
    city_p = np.array(list(CITY_WEIGHTS.values()))
    city = rng.choice(len(CITIES), size=n_rows, p=city_p / city_p.sum())

    params = np.array(list(_INDUSTRY_PARAMS.values()))
    share, log_median, rev_per_head, tax_rate = params.T
    # Industry mix shifts a little with the city: more IT and finance in the big three.
    big = np.isin(city, [CITIES.index(c) for c in ("Suzhou", "Nanjing", "Wuxi")])
    tilt = np.where(np.isin(np.array(INDUSTRIES), ["information_technology", "finance"]), 1.6, 1.0)
    probs = np.stack([share / share.sum(), share * tilt / (share * tilt).sum()])
    cum = np.cumsum(probs, axis=1)[big.astype(np.intp)]
    industry = np.minimum((rng.random(n_rows)[:, None] > cum).sum(axis=1), len(INDUSTRIES) - 1)

    employees = np.floor(np.exp(log_median[industry] + 1.2 * rng.standard_normal(n_rows)))
    employees = np.clip(employees, 0, _MAX_EMPLOYEES).astype(np.int64)
    revenue = (employees + 1) * rev_per_head[industry] * rng.lognormal(0.0, 0.6, n_rows)
    revenue = np.round(np.clip(revenue, 0.0, _MAX_REVENUE), 2)
    tax = revenue * tax_rate[industry] * rng.lognormal(0.0, 0.3, n_rows)
    tax = np.where(rng.random(n_rows) < 0.1, 0.0, tax)  # loss-making firms pay no profit tax
    tax = np.round(np.clip(tax, 0.0, _MAX_TAX), 2)
    age = rng.exponential(6.0 + 2.0 * np.log1p(employees))
    founded = np.clip(_LAST_YEAR - np.floor(age), _FIRST_YEAR, _LAST_YEAR).astype(np.int64)

    schema = enterprise_schema(n_rows).arrow_schema()
    arrays = [
        _pseudonymous_ids(n_rows, seed),
        _pick(CITIES, city),
        _pick(INDUSTRIES, industry),
        pa.array(employees, pa.int64()),
        pa.array(revenue, pa.float64()),
        pa.array(tax, pa.float64()),
        pa.array(founded, pa.int64()),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def write_demo_files(directory: Path, n_rows: int, seed: int = 2026) -> tuple[Path, Path]:
    """Write ``enterprises.parquet`` (zstd) and ``enterprises.schema.yaml`` into
    ``directory`` (created if missing); return ``(parquet_path, schema_path)``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    parquet_path = directory / "enterprises.parquet"
    schema_path = directory / "enterprises.schema.yaml"
    pq.write_table(generate_enterprises(n_rows, seed), parquet_path, compression="zstd")
    schema_path.write_text(enterprise_schema(n_rows).to_yaml(), encoding="utf-8")
    return parquet_path, schema_path
