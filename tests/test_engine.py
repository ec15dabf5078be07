"""The DP engine on its own: calibration, plans, intervals, refusals before data."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from conftest import POLICY_YAML

from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.policies.model import PolicyDocument
from sandbox.privacy import engine
from sandbox.privacy.spec import QuerySpec
from sandbox.privacy.validate import QueryRefused, check_query

N = 50_000
SCHEMA = enterprise_schema(N)
POLICY = PolicyDocument.from_yaml(POLICY_YAML)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    table = generate_enterprises(N, seed=11)
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    path = tmp_path_factory.mktemp("engine") / "data.parquet"
    frame.write_parquet(path)
    return path, frame


def spec(**kwargs: object) -> QuerySpec:
    base: dict[str, object] = {"dataset": "enterprises", "aggregates": [{"kind": "count"}],
                               "epsilon": 1.0}
    return QuerySpec.model_validate(base | kwargs)


def test_calibrated_measurement_spends_at_most_epsilon() -> None:
    for eps in (0.01, 0.1, 0.5, 1.0):
        prepared = engine.prepare(spec(epsilon=eps, aggregates=[
            {"kind": "count"}, {"kind": "sum", "column": "annual_revenue"},
            {"kind": "mean", "column": "employees"}], group_by=["city"]), SCHEMA)
        assert prepared.epsilon <= eps
        assert prepared.epsilon == pytest.approx(eps, rel=1e-6)
        assert prepared.measurement.check(1, eps)


def test_total_count_is_close(data: tuple[Path, pl.DataFrame]) -> None:
    path, frame = data
    result = engine.execute(engine.prepare(spec(), SCHEMA), path)
    cell = result["rows"][0]["count"]
    assert abs(cell["value"] - frame.height) < 50
    assert cell["low"] < cell["value"] < cell["high"]


def test_group_by_releases_every_public_key(data: tuple[Path, pl.DataFrame]) -> None:
    path, _ = data
    query = spec(group_by=["city", "industry"],
                 filters=[{"column": "city", "op": "in", "value": ["Nanjing", "Suzhou"]}])
    result = engine.execute(engine.prepare(query, SCHEMA), path)
    cities = len(SCHEMA.column("city").categories or [])
    industries = len(SCHEMA.column("industry").categories or [])
    assert len(result["rows"]) == cities * industries  # empty groups too, as noise


def test_mean_interval_contains_truth_usually(data: tuple[Path, pl.DataFrame]) -> None:
    path, frame = data
    truth = frame["employees"].mean()
    prepared = engine.prepare(spec(aggregates=[{"kind": "mean", "column": "employees"}]),
                              SCHEMA)
    hits = 0
    for _ in range(20):
        cell = engine.execute(prepared, path)["rows"][0]["mean_employees"]
        hits += cell["low"] <= truth <= cell["high"]
    assert hits >= 17


def test_estimate_touches_no_data() -> None:
    prepared = engine.prepare(spec(aggregates=[{"kind": "count"},
                                               {"kind": "sum", "column": "tax_paid"}]), SCHEMA)
    estimate = engine.estimate(prepared)
    assert estimate["epsilon"] == pytest.approx(1.0)
    assert estimate["half_width"]["count"] > 0 and estimate["half_width"]["sum_tax_paid"] > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_by": ["employees"]}, "policy does not allow group_by on L2"),
    ({"group_by": ["nope"]}, "no column 'nope'"),
    ({"aggregates": [{"kind": "sum", "column": "city"}]}, "not numeric"),
    ({"aggregates": [{"kind": "sum", "column": "enterprise_id"}]}, "L4"),
    ({"filters": [{"column": "city", "op": "==", "value": 3}]}, "does not match column type"),
    ({"epsilon": 1.5}, "per-job cap"),
])
def test_refusals_before_data(kwargs: dict, message: str) -> None:
    with pytest.raises(QueryRefused, match=message):
        check_query(spec(**kwargs), SCHEMA, POLICY)


@pytest.mark.parametrize("bad", [
    {"aggregates": []},
    {"aggregates": [{"kind": "count", "column": "x"}]},
    {"aggregates": [{"kind": "sum"}]},
    {"aggregates": [{"kind": "median", "column": "employees"}]},
    {"group_by": ["city", "city"]},
    {"filters": [{"column": "city", "op": "in", "value": "Nanjing"}]},
    {"filters": [{"column": "city", "op": "==", "value": ["Nanjing"]}]},
    {"code": "import os"},
])
def test_malformed_specs(bad: dict) -> None:
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        spec(**bad)
