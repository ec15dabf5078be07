"""The DP engine on its own: plans, calibration, intervals, every aggregate kind, the
OpenDP session filter, and refusals before data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from conftest import POLICY_YAML

from sandbox.datasets.generator import enterprise_schema, generate_enterprises
from sandbox.policies.model import PolicyDocument
from sandbox.privacy import engine
from sandbox.privacy.mechanisms import DatasetHandle, open_session
from sandbox.privacy.spec import QuerySpec
from sandbox.privacy.validate import QueryRefused, check_query

N = 50_000
SCHEMA = enterprise_schema(N)
POLICY = PolicyDocument.from_yaml(POLICY_YAML)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    frame = pl.from_arrow(generate_enterprises(N, seed=11))
    assert isinstance(frame, pl.DataFrame)
    path = tmp_path_factory.mktemp("engine") / "data.parquet"
    frame.write_parquet(path)
    return path, frame


def spec(**kwargs: object) -> QuerySpec:
    base: dict[str, object] = {"dataset": "enterprises", "aggregates": [{"kind": "count"}],
                               "epsilon": 1.0}
    return QuerySpec.model_validate(base | kwargs)


def run(query: QuerySpec, path: Path, *, left: float = 10.0) -> dict:
    unit = "rho" if query.rho is not None else "epsilon"
    approximate = query.delta is not None
    plan = engine.plan(query, SCHEMA)
    handle = DatasetHandle(path)
    session = open_session(handle, unit=unit, approximate=approximate, d_in=plan.d_in,
                           left=left, delta_left=1e-5 if approximate else 0.0)
    return engine.execute(plan, session, handle, approximate=approximate)


def test_total_count_is_close(data: tuple[Path, pl.DataFrame]) -> None:
    path, frame = data
    cell = run(spec(), path)["rows"][0]["count"]
    assert abs(cell["value"] - frame.height) < 50
    assert cell["low"] < cell["value"] < cell["high"]


def test_group_by_releases_every_public_key(data: tuple[Path, pl.DataFrame]) -> None:
    path, _ = data
    query = spec(group_by=["city", "industry"],
                 filters=[{"column": "city", "op": "in", "value": ["Nanjing", "Suzhou"]}])
    result = run(query, path)
    cities = len(SCHEMA.column("city").categories or [])
    industries = len(SCHEMA.column("industry").categories or [])
    assert len(result["rows"]) == cities * industries  # empty groups too, as noise


def test_sum_and_mean_close_to_truth(data: tuple[Path, pl.DataFrame]) -> None:
    path, frame = data
    result = run(spec(aggregates=[{"kind": "sum", "column": "annual_revenue"},
                                  {"kind": "mean", "column": "employees"}], epsilon=5.0), path)
    row = result["rows"][0]
    # three half-widths: a 95% interval misses 1 time in 20, three of them ~1 in 8000
    cell = row["sum_annual_revenue"]
    truth_sum = frame["annual_revenue"].clip(0, 100_000).sum()
    assert abs(cell["value"] - truth_sum) <= 3 * (cell["high"] - cell["low"]) / 2
    mean = row["mean_employees"]
    truth_mean = frame["employees"].mean()
    assert mean["low"] - (mean["high"] - mean["low"]) <= truth_mean \
        <= mean["high"] + (mean["high"] - mean["low"])


def test_median_and_quantile(data: tuple[Path, pl.DataFrame]) -> None:
    path, frame = data
    result = run(spec(aggregates=[{"kind": "median", "column": "founded_year"},
                                  {"kind": "quantile", "column": "founded_year", "q": 0.9}],
                      epsilon=2.0), path)
    row = result["rows"][0]
    median = float(np.median(frame["founded_year"].to_numpy()))
    assert abs(row["median_founded_year"]["value"] - median) <= 3
    q90 = float(np.quantile(frame["founded_year"].to_numpy(), 0.9))
    assert abs(row["quantile_90_founded_year"]["value"] - q90) <= 3
    assert row["median_founded_year"]["rank_error"] > 0


def test_grouped_median(data: tuple[Path, pl.DataFrame]) -> None:
    path, _ = data
    result = run(spec(group_by=["industry"], epsilon=2.0,
                      aggregates=[{"kind": "median", "column": "founded_year"}]), path)
    assert len(result["rows"]) == len(SCHEMA.column("industry").categories or [])
    for row in result["rows"]:
        assert 1950 <= row["median_founded_year"]["value"] <= 2025


def test_histogram(data: tuple[Path, pl.DataFrame]) -> None:
    path, frame = data
    bins = [0, 10, 50, 200, 5000]
    result = run(spec(aggregates=[{"kind": "histogram", "column": "employees", "bins": bins}],
                      epsilon=2.0), path)
    cell = result["rows"][0]["histogram_employees"]
    assert len(cell["counts"]) == 4
    truth = np.histogram(frame["employees"].to_numpy(), bins=bins)[0]
    for got, want in zip(cell["counts"], truth, strict=True):
        assert abs(got["value"] - want) < 40


def test_zcdp_gaussian(data: tuple[Path, pl.DataFrame]) -> None:
    path, frame = data
    result = run(spec(epsilon=None, rho=0.5), path)
    assert result["mechanism"] == "gaussian" and result["rho"] == 0.5
    assert abs(result["rows"][0]["count"]["value"] - frame.height) < 20


def test_dp_released_keys(data: tuple[Path, pl.DataFrame]) -> None:
    path, frame = data
    result = run(spec(group_by=["city"], keys="dp", delta=1e-7, epsilon=1.0), path)
    released = {r["city"] for r in result["rows"]}
    assert released and released <= set(frame["city"].unique().to_list())
    assert result["threshold"] >= 10


def test_session_filter_refuses_past_budget(data: tuple[Path, pl.DataFrame]) -> None:
    path, _ = data
    with pytest.raises(engine.EngineError):
        run(spec(epsilon=1.0), path, left=0.5)


def test_estimate_touches_no_data() -> None:
    plan = engine.plan(spec(aggregates=[{"kind": "count"},
                                        {"kind": "sum", "column": "tax_paid"},
                                        {"kind": "median", "column": "employees"}]), SCHEMA)
    estimate = engine.estimate(plan)
    assert estimate["cost"]["amount"] == pytest.approx(1.0)
    assert estimate["half_width"]["count"] > 0 and estimate["half_width"]["sum_tax_paid"] > 0
    assert estimate["rank_error"]["median_employees"] > 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"group_by": ["employees"]}, "policy does not allow group_by on L2"),
    ({"group_by": ["nope"]}, "no column 'nope'"),
    ({"aggregates": [{"kind": "sum", "column": "city"}]}, "not numeric"),
    ({"aggregates": [{"kind": "sum", "column": "enterprise_id"}]}, "L4"),
    ({"filters": [{"column": "city", "op": "==", "value": 3}]}, "does not match column type"),
    ({"epsilon": 1.5}, "per-job cap"),
    ({"epsilon": None, "rho": 0.1}, "budget is kept in epsilon"),
    ({"epsilon": None}, "state the query's privacy cost"),
])
def test_refusals_before_data(kwargs: dict, message: str) -> None:
    with pytest.raises(QueryRefused, match=message):
        check_query(spec(**kwargs), SCHEMA, POLICY)


def test_dp_keys_need_policy_permission() -> None:
    strict = PolicyDocument.from_yaml(POLICY_YAML.replace("dp_keys: true", "dp_keys: false"))
    with pytest.raises(QueryRefused, match="thresholding"):
        check_query(spec(group_by=["city"], keys="dp", delta=1e-7), SCHEMA, strict)


@pytest.mark.parametrize("bad", [
    {"aggregates": []},
    {"aggregates": [{"kind": "count", "column": "x"}]},
    {"aggregates": [{"kind": "sum"}]},
    {"aggregates": [{"kind": "quantile", "column": "employees"}]},
    {"aggregates": [{"kind": "histogram", "column": "employees", "bins": [3, 1]}]},
    {"group_by": ["city", "city"]},
    {"filters": [{"column": "city", "op": "in", "value": "Nanjing"}]},
    {"filters": [{"column": "city", "op": "==", "value": ["Nanjing"]}]},
    {"code": "import os"},
    {"epsilon": 1.0, "rho": 1.0},
    {"keys": "dp", "group_by": ["city"]},
    {"delta": 1e-6},
])
def test_malformed_specs(bad: dict) -> None:
    from pydantic import ValidationError
    with pytest.raises(ValidationError):
        spec(**bad)
