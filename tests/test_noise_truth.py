"""Noise truth: the noise the engine adds is the noise it states.

Over many releases on a small generated dataset, ``release - true value`` must follow the
stated distribution (Kolmogorov-Smirnov) on the Laplace path (epsilon) and the Gaussian
path (rho), and the stated 95% intervals must cover the truth at least 95% of the time,
within sampling error. The stated scale is derived from the plan the way
``engine.estimate`` derives its half-widths (the calibrated scale of the normalised
parts, times each part's sensitivity and its scale back to released units), and is also
checked against the closed form (sensitivity / epsilon; sensitivity / sqrt(2 rho)).

The engine hands counts to OpenDP as floats (``mechanisms.linear``: float vector Laplace /
Gaussian on a very fine grid), so a noisy count is a non-integer float and the continuous
distributions are the right reference, even at scale 1. A negative control shows the
test can fail: the same samples are rejected against half and twice the stated scale.

Every release here is a fresh broker session sized to exactly one query's cost, as the
worker opens it (one long session would also work, but its filter gets slower per query).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from scipy import stats

from sandbox.datasets.generator import CITIES, enterprise_schema, generate_enterprises
from sandbox.privacy import engine
from sandbox.privacy import mechanisms as mech
from sandbox.privacy.mechanisms import DatasetHandle, open_session
from sandbox.privacy.spec import QuerySpec

N_ROWS = 2000
SCHEMA = enterprise_schema(N_ROWS)
SAMPLES = 2000  # per case (grouped: ceil(SAMPLES / 13) releases of 13 cells)
P_FAIL = 1e-3  # a KS p-value below this fails the test
REVENUE_BOUND = 100_000.0  # enterprise_schema's annual_revenue bounds are (0, 1e5)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[DatasetHandle, pl.DataFrame]:
    frame = pl.from_arrow(generate_enterprises(N_ROWS, seed=19))
    assert isinstance(frame, pl.DataFrame)
    path = tmp_path_factory.mktemp("noise") / "data.parquet"
    frame.write_parquet(path)
    return DatasetHandle(Path(path)), frame


@dataclass(frozen=True)
class Case:
    id: str
    query: dict[str, Any]
    output: str  # the released column
    closed_form_scale: float  # what the scale must be, from first principles

    @property
    def gaussian(self) -> bool:
        return "rho" in self.query


CASES = [
    # count, sensitivity 1, epsilon 0.5 -> Laplace scale 2
    Case("laplace-count", {"aggregates": [{"kind": "count"}], "epsilon": 0.5}, "count", 2.0),
    # sum clipped to [0, 1e5], sensitivity 1e5, epsilon 1 -> Laplace scale 1e5
    Case("laplace-sum", {"aggregates": [{"kind": "sum", "column": "annual_revenue"}],
                         "epsilon": 1.0}, "sum_annual_revenue", REVENUE_BOUND),
    # count, sensitivity 1, rho 0.5 -> Gaussian sigma 1 / sqrt(2 * 0.5) = 1
    Case("gaussian-count", {"aggregates": [{"kind": "count"}], "rho": 0.5}, "count", 1.0),
    # 13 city counts, one row in one city (L1 sensitivity 1), epsilon 1 -> scale 1 per cell
    Case("laplace-grouped-count", {"aggregates": [{"kind": "count"}], "group_by": ["city"],
                                   "epsilon": 1.0}, "count", 1.0),
]


def _truth(case: Case, frame: pl.DataFrame) -> dict[str | None, float]:
    """The exact value per group (``None`` for the single ungrouped row), computed here
    independently of the engine's own aggregation."""
    if "group_by" in case.query:
        counts = dict(frame.group_by("city").len().iter_rows())
        return {city: float(counts.get(city, 0)) for city in CITIES}
    if case.output == "count":
        return {None: float(frame.height)}
    # the engine sums on a fixed-point grid of bound / 2**20 (about 0.1): at most
    # 2000 * 0.05 away from this, against a noise scale of 1e5
    return {None: float(frame["annual_revenue"].clip(0.0, REVENUE_BOUND).sum())}


def _stated_scale(plan: engine.Plan, output: str) -> float:
    """The noise scale in released units, as ``engine.estimate`` derives half-widths."""
    out = next(o for o in plan.outputs if o.name == output)
    part = next(p for p in plan.parts if p.name == out.parts[0])
    calibrated = mech.linear(lambda _h: [], n_parts=len(plan.parts), d_in=plan.d_in,
                             unit=plan.unit, budget=plan.share).scale
    return calibrated * part.sensitivity * part.scale_back


@dataclass(frozen=True)
class Sample:
    scale: float
    errors: np.ndarray  # release - truth, one per released cell
    covered: np.ndarray  # low <= truth <= high, per cell
    half_widths: np.ndarray
    values: np.ndarray


_samples: dict[str, Sample] = {}


def _sample(case: Case, data: tuple[DatasetHandle, pl.DataFrame]) -> Sample:
    if case.id in _samples:
        return _samples[case.id]
    handle, frame = data
    query = QuerySpec.model_validate({"dataset": "enterprises", **case.query})
    plan = engine.plan(query, SCHEMA)  # once: data-independent
    truth = _truth(case, frame)
    releases = math.ceil(SAMPLES / len(truth))
    errors, covered, half_widths, values = [], [], [], []
    for _ in range(releases):
        session = open_session(handle, unit=plan.unit, approximate=False, d_in=plan.d_in,
                               left=plan.cost.amount)
        result = engine.execute(plan, session, handle, approximate=False)
        assert result["mechanism"] == ("gaussian" if case.gaussian else "laplace")
        assert len(result["rows"]) == len(truth)
        for row in result["rows"]:
            cell, true = row[case.output], truth[row.get("city")]
            values.append(cell["value"])
            errors.append(cell["value"] - true)
            covered.append(cell["low"] <= true <= cell["high"])
            half_widths.append((cell["high"] - cell["low"]) / 2)
    sample = Sample(_stated_scale(plan, case.output), np.array(errors), np.array(covered),
                    np.array(half_widths), np.array(values))
    _samples[case.id] = sample
    return sample


def _reference(case: Case, scale: float) -> Any:
    return stats.norm(scale=scale) if case.gaussian else stats.laplace(scale=scale)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_stated_scale_and_interval(case: Case, data: tuple[DatasetHandle, pl.DataFrame]
                                   ) -> None:
    """The scale the plan states is the textbook one, and the reported 95% interval is
    exactly that distribution's central 95% (Laplace: b ln 20; Gaussian: 1.96 sigma)."""
    sample = _sample(case, data)
    assert sample.scale == pytest.approx(case.closed_form_scale, rel=1e-6)
    z = stats.norm.ppf(0.975) if case.gaussian else math.log(1 / engine.ALPHA)
    np.testing.assert_allclose(sample.half_widths, sample.scale * z, rtol=1e-9)
    assert sample.errors.size >= SAMPLES


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_release_minus_truth_follows_stated_distribution(
        case: Case, data: tuple[DatasetHandle, pl.DataFrame]) -> None:
    sample = _sample(case, data)
    result = stats.kstest(sample.errors, _reference(case, sample.scale).cdf)
    assert result.pvalue >= P_FAIL, (
        f"{case.id}: KS D={result.statistic:.4f} p={result.pvalue:.2e} over "
        f"{sample.errors.size} releases at stated scale {sample.scale:g}")
    # counts are not rounded to integers: the continuous reference is the right one
    assert np.mean(sample.values == np.round(sample.values)) < 0.01


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_stated_intervals_cover(case: Case, data: tuple[DatasetHandle, pl.DataFrame]) -> None:
    sample = _sample(case, data)
    n = sample.covered.size
    floor = 0.95 - 3 * math.sqrt(0.95 * 0.05 / n)
    assert sample.covered.mean() >= floor, (
        f"{case.id}: {sample.covered.mean():.3f} of {n} intervals cover (floor {floor:.3f})")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_negative_control_wrong_scale_is_rejected(
        case: Case, data: tuple[DatasetHandle, pl.DataFrame]) -> None:
    """The KS check has teeth: the same samples against half or twice the stated scale
    are rejected (so a mechanism off by a factor of two could not pass)."""
    sample = _sample(case, data)
    for factor in (0.5, 2.0):
        result = stats.kstest(sample.errors, _reference(case, factor * sample.scale).cdf)
        assert result.pvalue < P_FAIL, (case.id, factor, result.pvalue)
