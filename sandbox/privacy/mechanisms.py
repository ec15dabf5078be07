"""OpenDP measurements over the broker's dataset handle, and the session filter.

Every release is an OpenDP measurement whose input is the dataset handle (an opaque
``user_domain`` value) under the symmetric distance with the privacy unit's row bound as
``d_in``. The stable part is the broker's own Polars aggregation
(``sandbox.privacy.aggregate``), declared to OpenDP as a user transformation whose
stability map states its sensitivity (this needs OpenDP's "honest-but-curious" feature:
the map is our claim, the noise and the privacy accounting are OpenDP's). The noise is
OpenDP's: vector Laplace (epsilon) or Gaussian (rho) on the parts, each part divided by its
per-row sensitivity so that one scale serves all; report-noisy-max for quantiles; Laplace
thresholding for keys released by DP.

Each broker session opens one OpenDP privacy filter (fully adaptive composition) over
the dataset handle, sized to what the ledger says is left; every measurement goes
through it, so OpenDP itself refuses anything past the budget. OpenDP objects are never
persisted: a new session is opened from the ledger each time.

Scales come in closed form (loss is proportional to 1/scale, or 1/scale^2 for zCDP) and
OpenDP's ``check`` confirms each measurement fits its share of the cost; the binary
search that OpenDP's ``Context.release()`` runs (about 4 s a query) is not needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import opendp.prelude as dp
import polars as pl

from sandbox.datasets.plaintext import PlainBuffer

dp.enable_features("contrib", "honest-but-curious")

VECTOR = dp.vector_domain(dp.atom_domain(T=float, nan=False))


class DatasetHandle:
    """What the broker's OpenDP session holds: the decrypted dataset, never given out.

    ``source`` is the worker's RAM buffer holding the decrypted Parquet file (scanned in
    place, no copy), or a Parquet file path (mock data, tests). The buffer must stay
    open, and unchanged, while the handle is used.
    """

    def __init__(self, source: Path | PlainBuffer) -> None:
        self._source = source

    def lazy(self, columns: list[str]) -> pl.LazyFrame:
        """A lazy scan of ``columns`` (projection pushed down to the Parquet reader)."""
        source = self._source
        if isinstance(source, PlainBuffer):
            with source.reader() as reader:  # Polars keeps its own duplicate descriptor
                return pl.scan_parquet(reader).select(columns)
        return pl.scan_parquet(source).select(columns)


DATASET = dp.user_domain("SandboxDataset", member=lambda x: isinstance(x, DatasetHandle))
METRIC = dp.symmetric_distance()


def measure_for(unit: str, approximate: bool) -> Any:
    base = dp.max_divergence() if unit == "epsilon" else dp.zero_concentrated_divergence()
    return dp.approximate(base) if approximate else base


def open_session(handle: DatasetHandle, *, unit: str, approximate: bool, d_in: int,
                 left: float, delta_left: float = 0.0) -> Any:
    """An OpenDP privacy filter over ``handle`` that admits at most ``left`` (and
    ``delta_left``) more privacy loss, in the budget's unit."""
    odometer = dp.c.make_fully_adaptive_composition(DATASET, METRIC,
                                                    measure_for(unit, approximate))
    d_out: Any = (max(left, 0.0), max(delta_left, 0.0)) if approximate else max(left, 0.0)
    return dp.c.make_privacy_filter(odometer, d_in=d_in, d_out=d_out)(handle)


def adapt(measurement: Any, unit: str, approximate: bool) -> Any:
    """Express ``measurement`` in the session's measure (exact conversions only)."""
    name = str(measurement.output_measure)
    if unit == "rho" and name.startswith("MaxDivergence"):
        measurement = dp.c.make_pureDP_to_zCDP(measurement)
    if approximate and not str(measurement.output_measure).startswith("Approximate"):
        measurement = dp.c.make_approximate(measurement)
    return measurement


@dataclass(frozen=True)
class Calibrated:
    measurement: Any
    scale: float


def _calibrate(make: Callable[[float], Any], first: float, d_in: int, budget: float) -> Calibrated:
    scale = first
    for attempt in range(40):
        measurement = make(scale)
        if measurement.check(d_in, budget):
            return Calibrated(measurement, scale)
        scale *= 1 + 1e-12 * 4**attempt
    raise RuntimeError("could not calibrate the noise scale")  # pragma: no cover


def linear(function: Callable[[DatasetHandle], list[float]], *, n_parts: int, d_in: int,
           unit: str, budget: float) -> Calibrated:
    """Noise on the normalised parts: Laplace for epsilon, Gaussian for rho."""
    if unit == "epsilon":
        stable = dp.t.make_user_transformation(
            DATASET, METRIC, VECTOR, dp.l1_distance(T=float), function=function,
            stability_map=lambda d: float(d) * n_parts)
        return _calibrate(lambda s: stable >> dp.m.then_laplace(s),
                          d_in * n_parts / budget, d_in, budget)
    stable = dp.t.make_user_transformation(
        DATASET, METRIC, VECTOR, dp.l2_distance(T=float), function=function,
        stability_map=lambda d: float(d) * math.sqrt(n_parts))
    return _calibrate(lambda s: stable >> dp.m.then_gaussian(s),
                      d_in * math.sqrt(n_parts) / math.sqrt(2 * budget), d_in, budget)


def noisy_argmin(function: Callable[[DatasetHandle], list[float]], *, groups: int,
                 candidates: int, sensitivity: float, d_in: int, unit: str,
                 budget: float) -> Calibrated:
    """Report-noisy-min over each group's candidate scores (the exponential mechanism).

    A row changes one group's scores by at most ``sensitivity``; with ``d_in`` rows per
    unit, at most ``d_in`` groups change, each by at most ``d_in * sensitivity``, so the
    loss is at most ``d_in`` times one group's loss at that distance (sequential
    composition; with one row per unit this is parallel composition).
    """
    measure = dp.max_divergence() if unit == "epsilon" else dp.zero_concentrated_divergence()
    stable = dp.t.make_user_transformation(
        DATASET, METRIC, VECTOR, dp.linf_distance(T=float), function=function,
        stability_map=lambda d: float(d) * sensitivity)

    def make(scale: float) -> Any:
        one = dp.m.make_noisy_max(VECTOR, dp.linf_distance(T=float), measure, scale,
                                  negate=True)

        def per_group(scores: list[float]) -> list[int]:
            return [int(one(scores[g * candidates:(g + 1) * candidates]))
                    for g in range(groups)]

        # each group's argmin is OpenDP's mechanism; only the composition is ours
        rows = min(d_in, groups)
        grouped = dp.m.make_user_measurement(
            VECTOR, dp.linf_distance(T=float), measure, per_group,
            privacy_map=lambda d: one.map(d) * rows)
        return stable >> grouped

    first = 2 * d_in * sensitivity * min(d_in, groups) / budget if unit == "epsilon" \
        else d_in * sensitivity * min(d_in, groups) / math.sqrt(8 * budget)
    return _calibrate(make, max(first, 1e-9), d_in, budget)


def threshold(function: Callable[[DatasetHandle], dict[str, float]], *, d_in: int,
              epsilon: float, delta: float, minimum: float) -> tuple[Calibrated, float]:
    """Laplace noise on observed key counts; keys whose noisy count clears the threshold
    are released. Returns the measurement and its threshold."""
    domain = dp.map_domain(dp.atom_domain(T=dp.String), dp.atom_domain(T=float, nan=False))
    metric = dp.l01inf_distance(dp.absolute_distance(T=float))
    stable = dp.t.make_user_transformation(
        DATASET, METRIC, domain, metric, function=function,
        stability_map=lambda d: (int(d), float(d), float(d)))
    scale = d_in / epsilon
    cut = max(float(minimum), d_in + scale * math.log(1 / max(delta, 1e-300)))

    def make(s: float) -> Any:
        return stable >> dp.m.then_laplace_threshold(scale=s, threshold=cut)

    for _ in range(60):
        measurement = make(scale)
        if measurement.check(d_in, (epsilon, delta)):
            return Calibrated(measurement, scale), cut
        cut *= 1.05
        scale *= 1 + 1e-9
    raise RuntimeError("could not calibrate the key threshold")  # pragma: no cover


def half_width(unit: str, scale: float, alpha: float) -> float:
    """Half-width of a (1 - alpha) interval for one noisy value at ``scale``."""
    if unit == "epsilon":
        return float(dp.laplacian_scale_to_accuracy(scale, alpha))
    return float(dp.gaussian_scale_to_accuracy(scale, alpha))


def as_floats(vector: np.ndarray) -> list[float]:
    return [float(v) for v in vector]
