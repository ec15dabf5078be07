"""SDC mode (attack catalogue 31, 32): primary rules, secondary suppression, rounding,
per-unit cell statistics, and agreement with ACRO's verdicts on the same tables."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pytest
from conftest import missing_part

from sandbox.privacy.sdc import SdcResult, SdcRules, apply_sdc, cell_stats, primary_flags

RULES = SdcRules()


def sum_cells(rows: list[tuple[str, int, float, float, float]]) -> pl.DataFrame:
    """One-key sum cells from (key, n, total, top1, top2)."""
    return pl.DataFrame(rows, schema=["k", "n", "total", "top1", "top2"], orient="row")


def count_grid(counts: np.ndarray) -> pl.DataFrame:
    """Two-key count cells from a matrix of n."""
    return pl.DataFrame([(f"r{i}", f"c{j}", int(counts[i, j]))
                         for i in range(counts.shape[0]) for j in range(counts.shape[1])],
                        schema=["r", "c", "n"], orient="row")


def status_of(result: SdcResult) -> dict[tuple[Any, ...], str]:
    keys = [c for c in result.table.columns if c not in ("count", "sum", "status")]
    return {row[:-1]: row[-1] for row in result.table.select(*keys, "status").rows()}


# ---- a checker: can a suppressed cell be recovered from released margins? ----

def assert_protected(table: pl.DataFrame, keys: list[str]) -> None:
    """Every 1-D margin (table total, row and column totals, ...) is assumed released.

    1. No line of the table holds exactly one suppressed cell.
    2. For two keys, no suppressed cell is pinned by the linear system of row and column
       totals (its unit vector is not in the row space of the line-incidence matrix).
    """
    hidden = table.with_row_index("_i").filter(pl.col("status") != "ok")
    for d in range(len(keys)):
        others = keys[:d] + keys[d + 1:]
        lines = (hidden.group_by(others).agg(pl.len().alias("k")) if others
                 else hidden.select(pl.len().alias("k")))
        lonely = lines.filter(pl.col("k") == 1)
        assert lonely.is_empty(), f"a line along {keys[d]!r} has one suppressed cell: {lonely}"
    if len(keys) == 2 and hidden.height:
        cells = hidden.select(keys).rows()
        index = {cell: j for j, cell in enumerate(cells)}
        rows = []
        for d in range(2):
            for line in {cell[1 - d] for cell in cells}:
                rows.append([1.0 if cell[1 - d] == line else 0.0 for cell in index])
        a = np.array(rows)
        rank = np.linalg.matrix_rank(a)
        for cell, j in index.items():
            probe = np.vstack([a, np.eye(len(index))[j]])
            assert np.linalg.matrix_rank(probe) > rank, f"cell {cell} recoverable from margins"


def test_checker_catches_a_bridge_cell() -> None:
    """Two suppressed 2x2 blocks joined by one cell: every line holds >= 2, yet the
    joining cell is pinned by the margins. The checker must see it."""
    hidden = {(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3), (1, 2)}
    table = pl.DataFrame([(f"r{i}", f"c{j}", "primary:threshold" if (i, j) in hidden else "ok")
                          for i in range(4) for j in range(4)],
                         schema=["r", "c", "status"], orient="row")
    with pytest.raises(AssertionError, match="recoverable"):
        assert_protected(table, ["r", "c"])


# ---- rules ----

@pytest.mark.parametrize(("field", "bad"), [
    ("threshold", 0), ("threshold", 2.5), ("threshold", True), ("p_percent", -1.0),
    ("p_percent", float("nan")), ("p_percent", 101.0), ("nk_n", 0), ("nk_k", 0.0),
    ("nk_k", 1.5), ("nk_k", float("inf")), ("rounding_base", 0), ("secondary", 1),
    ("sum_significant_figures", 0)])
def test_rules_reject_bad_values_naming_the_field(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        SdcRules(**{field: bad})  # type: ignore[arg-type]


def test_threshold_boundary_and_zero_cells() -> None:
    cells = pl.DataFrame({"k": ["a", "b", "c", "d"], "n": [9, 10, 0, 30]})
    result = apply_sdc(cells, ["k"], RULES, kind="count")
    assert status_of(result) == {("a",): "primary:threshold", ("b",): "ok",
                                 ("c",): "primary:threshold", ("d",): "ok"}
    assert result.table["count"].to_list() == [None, 10, None, 30]


def test_p_percent_boundary() -> None:
    # (total - top1 - top2) / top1 < p/100 fails; equality passes.
    cells = sum_cells([("at", 20, 160.0, 100.0, 50.0),      # rest 10 = 10% of 100: safe
                       ("below", 20, 159.0, 100.0, 50.0),   # rest 9: fails
                       ("zero", 20, 0.0, 0.0, 0.0),         # all contributors are 0: fails
                       ("empty", 0, 0.0, 0.0, 0.0)])        # no contributor: threshold only
    flags = primary_flags(cells, ["k"], RULES, kind="sum")
    got = {r["k"]: (r["fails_threshold"], r["fails_p"]) for r in flags.to_dicts()}
    assert got == {"at": (False, False), "below": (False, True), "zero": (False, True),
                   "empty": (True, False)}
    assert flags["fails_nk"].to_list()[2:] == [False, False]  # 0/0 is not >= k
    assert not primary_flags(cells, ["k"], SdcRules(p_percent=9.0), kind="sum")["fails_p"][1]


def test_nk_boundary_flags_at_equality_like_acro() -> None:
    # (top1 + top2) / total >= k fails (ACRO NKCheck), so exactly 90% fails, 89% passes.
    cells = sum_cells([("at", 20, 100.0, 45.0, 45.0), ("under", 20, 100.0, 45.0, 44.0)])
    flags = primary_flags(cells, ["k"], RULES, kind="sum")
    assert flags["fails_nk"].to_list() == [True, False]
    assert flags["fails_p"].to_list() == [False, False]
    one = primary_flags(cells, ["k"], SdcRules(nk_n=1, nk_k=0.45), kind="sum")
    assert one["fails_nk"].to_list() == [True, True]


def test_status_priority_and_nk_needs_enough_tops() -> None:
    cells = sum_cells([("a", 3, 100.0, 98.0, 1.0), ("b", 20, 100.0, 95.0, 1.0),
                       ("c", 20, 100.0, 45.0, 45.0), ("d", 20, 100.0, 10.0, 10.0),
                       ("e", 20, 100.0, 10.0, 9.0)])
    result = apply_sdc(cells, ["k"], RULES, kind="sum")
    assert [s for s in result.table["status"]] == [
        "primary:threshold", "primary:p%", "primary:nk", "ok", "ok"]
    with pytest.raises(ValueError, match="top3"):
        apply_sdc(cells, ["k"], SdcRules(nk_n=3), kind="sum")


@pytest.mark.parametrize(("cells", "message"), [
    (pl.DataFrame({"k": ["a", "a"], "n": [10, 20]}), "duplicate"),
    (pl.DataFrame({"k": ["a"], "n": [-1]}), "'n'"),
    (pl.DataFrame({"k": ["a"], "n": [1.5]}), "'n'"),
    (pl.DataFrame({"k": ["a"]}), "lack"),
    (pl.DataFrame({"n": ["a"], "x": [1]}), "clashes")])
def test_bad_cells_are_refused(cells: pl.DataFrame, message: str) -> None:
    keys = ["n"] if message == "clashes" else ["k"]
    with pytest.raises(ValueError, match=message):
        apply_sdc(cells, keys, RULES, kind="count")


def test_sum_cells_are_checked() -> None:
    with pytest.raises(ValueError, match="'top2' exceeds 'top1'"):
        apply_sdc(sum_cells([("a", 20, 100.0, 10.0, 20.0)]), ["k"], RULES, kind="sum")
    with pytest.raises(ValueError, match="'total'"):
        apply_sdc(sum_cells([("a", 20, float("nan"), 10.0, 2.0)]), ["k"], RULES, kind="sum")


# ---- secondary suppression ----

def test_one_key_single_primary_takes_the_smallest_safe_cell() -> None:
    cells = pl.DataFrame({"k": ["a", "b", "c", "d", "e"], "n": [50, 3, 12, 40, 12]})
    result = apply_sdc(cells, ["k"], RULES, kind="count")
    assert status_of(result) == {("a",): "ok", ("b",): "primary:threshold",
                                 ("c",): "secondary", ("d",): "ok", ("e",): "ok"}
    assert_protected(result.table, ["k"])
    two = apply_sdc(cells.with_columns(n=pl.Series([5, 3, 12, 40, 12])), ["k"], RULES,
                    kind="count")
    assert two.status_counts["secondary"] == 0
    off = apply_sdc(cells, ["k"], SdcRules(secondary=False), kind="count")
    assert off.status_counts["secondary"] == 0
    assert any("OFF" in f for f in off.findings)


def test_unprotectable_line_is_reported() -> None:
    result = apply_sdc(pl.DataFrame({"k": ["a"], "n": [3]}), ["k"], RULES, kind="count")
    assert any("do not release those marginal totals" in f for f in result.findings)


def test_bridge_between_suppressed_blocks_is_closed() -> None:
    counts = np.full((5, 5), 100)
    for i, j in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 2), (2, 3), (3, 2), (3, 3), (1, 2)]:
        counts[i, j] = 2
    result = apply_sdc(count_grid(counts), ["r", "c"], RULES, kind="count")
    assert result.status_counts["secondary"] >= 1
    assert_protected(result.table, ["r", "c"])


@pytest.mark.parametrize("seed", range(40))
def test_two_key_tables_are_protected(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = rng.integers(2, 8, size=2)
    counts = rng.integers(0, 60, size=shape) * (rng.random(shape) > 0.15)
    result = apply_sdc(count_grid(counts), ["r", "c"], RULES, kind="count")
    assert_protected(result.table, ["r", "c"])
    assert not any("do not release" in f or "release no" in f for f in result.findings)


@pytest.mark.parametrize("seed", range(10))
def test_one_and_three_key_tables_are_protected(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    one = pl.DataFrame({"k": [f"k{i}" for i in range(6)], "n": rng.integers(0, 40, 6)})
    assert_protected(apply_sdc(one, ["k"], RULES, kind="count").table, ["k"])
    three = pl.DataFrame([(a, b, c, int(rng.integers(0, 50)))
                          for a in "xyz" for b in "pq" for c in "uvw"],
                         schema=["a", "b", "c", "n"], orient="row")
    assert_protected(apply_sdc(three, ["a", "b", "c"], RULES, kind="count").table,
                     ["a", "b", "c"])


# ---- rounding, findings, determinism ----

def test_rounding() -> None:
    cells = pl.DataFrame({"k": list("abcdef"), "n": [10, 12, 13, 17, 18, 1002]})
    assert apply_sdc(cells, ["k"], RULES, kind="count").table["count"].to_list() == [
        10, 10, 15, 15, 20, 1000]
    ten = pl.DataFrame({"k": list("abc"), "n": [15, 25, 35]})
    assert apply_sdc(ten, ["k"], SdcRules(rounding_base=10), kind="count").table[
        "count"].to_list() == [20, 20, 40]  # halves to the even multiple
    assert apply_sdc(ten, ["k"], SdcRules(rounding_base=1), kind="count").table[
        "count"].to_list() == [15, 25, 35]
    sums = sum_cells([("a", 20, 123456.0, 100.0, 90.0), ("b", 20, 98765.0, 100.0, 90.0)])
    assert apply_sdc(sums, ["k"], RULES, kind="sum").table["sum"].to_list() == [123000.0,
                                                                                98800.0]


def test_findings_count_reasons_but_carry_no_value() -> None:
    cells = sum_cells([("a", 3, 987654.0, 900000.0, 80000.0), ("b", 40, 555555.0, 999.0, 998.0),
                       ("c", 40, 444444.0, 999.0, 998.0)])
    result = apply_sdc(cells, ["k"], RULES, kind="sum")
    text = " ".join(result.findings)
    assert "1 primary:threshold" in text and "1 secondary" in text and "review" in text
    for secret in ("987", "9876", "444", "900000", "80000"):
        assert secret not in text
    assert result.table.filter(pl.col("status") != "ok")["sum"].null_count() == 2


def test_deterministic_under_row_order() -> None:
    rng = np.random.default_rng(7)
    cells = count_grid(rng.integers(0, 30, size=(6, 5)))
    first = apply_sdc(cells, ["r", "c"], RULES, kind="count")
    again = apply_sdc(cells.sample(fraction=1.0, shuffle=True, seed=3), ["r", "c"], RULES,
                      kind="count")
    assert first.table.equals(again.table) and first.findings == again.findings


# ---- cell_stats ----

def test_cell_stats_measures_dominance_per_unit() -> None:
    rows = pl.DataFrame({
        "k": ["a"] * 6 + ["b"] * 2,
        "unit": ["u1", "u1", "u1", "u2", "u3", "u3", "u4", "u5"],
        "v": [10, 20, 30, 5, 1, 2, None, 7]})
    per_unit = cell_stats(rows.lazy(), ["k"], "v", "unit")
    assert per_unit.to_dicts() == [
        {"k": "a", "n": 3, "total": 68, "top1": 60, "top2": 5},
        {"k": "b", "n": 2, "total": 7, "top1": 7, "top2": 0}]
    per_row = cell_stats(rows, ["k"], "v", None)
    assert per_row.row(0, named=True) == {"k": "a", "n": 6, "total": 68, "top1": 30, "top2": 20}
    counts = cell_stats(rows, ["k"], None, "unit")
    assert counts["n"].to_list() == [3, 2]
    three = cell_stats(rows, ["k"], "v", "unit", top_n=3)
    assert three["top3"].to_list() == [3, 0]


def test_cell_stats_complete_grid_and_refusals() -> None:
    rows = pl.DataFrame({"r": ["a", "a", "b"], "c": ["x", "y", "x"], "v": [1.0, 2.0, 3.0]})
    grid = cell_stats(rows, ["r", "c"], "v", None, complete=True)
    assert grid.select("r", "c", "n").rows() == [("a", "x", 1), ("a", "y", 1), ("b", "x", 1),
                                                 ("b", "y", 0)]
    with pytest.raises(ValueError, match="negative or non-finite"):
        cell_stats(rows.with_columns(v=pl.lit(-1.0)), ["r"], "v", None)
    with pytest.raises(ValueError, match="negative or non-finite"):
        cell_stats(rows.with_columns(v=pl.lit(float("inf"))), ["r"], "v", None)
    with pytest.raises(ValueError, match="null ids"):
        cell_stats(rows.with_columns(u=pl.lit(None, pl.String)), ["r"], "v", "u")
    with pytest.raises(ValueError, match="not numeric"):
        cell_stats(rows, ["r"], "c", None)
    with pytest.raises(ValueError, match="'zz'"):
        cell_stats(rows, ["zz"], None, None)


# ---- agreement with ACRO (SACRO's output checker) ----

ACRO_NAMES = {"threshold": "MinimumThresholdCheck", "p": "PPercentCheck", "nk": "NKCheck"}


def make_frame(seed: int) -> Any:
    """Rows with skewed categories (tiny and empty cells), a skewed integer-valued
    amount, whales that dominate, and a category where every amount is 0."""
    import pandas as pd
    rng = np.random.default_rng(seed)
    size = int(rng.integers(150, 500))
    frame = pd.DataFrame({
        "region": rng.choice(["north", "south", "east", "west", "isle"], size,
                             p=[0.35, 0.3, 0.2, 0.13, 0.02]),
        "sector": rng.choice(["farm", "mine", "shop", "mill"], size, p=[0.4, 0.3, 0.25, 0.05]),
        "size": rng.choice(["s", "l"], size, p=[0.8, 0.2]),
        "amount": np.floor(rng.lognormal(3.0, 1.5, size))})
    whales = rng.random(size) < 0.03
    frame.loc[whales, "amount"] = np.floor(rng.uniform(1e4, 1e6, int(whales.sum())))
    frame.loc[frame["sector"] == "mill", "amount"] = 0.0
    return frame


def acro_outcome(frame: Any, keys: list[str], kind: str, appetite: dict[str, Any]) -> Any:
    try:
        from acro import ACRO
    except ImportError as exc:
        missing_part(f"acro is not installed ({exc}); pip install acro==1.0.2")
    logging.getLogger("acro").setLevel(logging.WARNING)
    checker = ACRO(suppress=False)
    checker.sdc_checks.risk_appetite.update(appetite)
    aggfunc = None if kind == "count" else "sum"
    if len(keys) == 1:
        checker.pivot_table(frame, index=keys, values="amount", aggfunc=kind)
    else:
        index = [frame[k] for k in keys[:-1]]
        values = None if kind == "count" else frame["amount"]
        checker.crosstab(index, frame[keys[-1]], values=values, aggfunc=aggfunc)
    (record,) = checker.results.results.values()
    return record.outcome


@pytest.mark.filterwarnings("ignore::FutureWarning")  # pandas warnings inside acro
@pytest.mark.parametrize("kind", ["count", "sum"])
@pytest.mark.parametrize("keys", [["region"], ["region", "sector"],
                                  ["region", "size", "sector"]])
@pytest.mark.parametrize(("seed", "rules"), [
    (1, RULES), (2, RULES), (3, RULES),
    (4, SdcRules(threshold=5, p_percent=20.0, nk_n=3, nk_k=0.8))])
def test_primary_verdicts_match_acro(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     kind: Literal["count", "sum"], keys: list[str],
                                     seed: int, rules: SdcRules) -> None:
    monkeypatch.chdir(tmp_path)  # ACRO may write its outputs folder
    frame = make_frame(seed)
    appetite = {"safe_threshold": rules.threshold, "safe_pratio_p": rules.p_percent / 100,
                "safe_nk_n": rules.nk_n, "safe_nk_k": rules.nk_k}
    outcome = acro_outcome(frame, keys, kind, appetite)
    value = None if kind == "count" else "amount"
    cells = cell_stats(pl.from_pandas(frame), keys, value, None, top_n=rules.nk_n,
                       complete=True)
    flags = primary_flags(cells, keys, rules, kind=kind)
    column = "amount" if len(keys) == 1 else None
    seen = {"threshold": 0, "p": 0, "nk": 0}
    assert flags.height == outcome.size
    for row in flags.iter_rows(named=True):
        where = row[keys[0]] if len(keys) < 3 else (row[keys[0]], row[keys[1]])
        verdict = str(outcome.loc[where, column if column else row[keys[-1]]])
        for rule, name in ACRO_NAMES.items():
            ours = row[f"fails_{rule}"]
            seen[rule] += ours
            assert ours == (name in verdict), (keys, kind, row, verdict)
        if "PresenceOfZeroCheck" in verdict:
            assert row["n"] == 0 and row["fails_threshold"]
    if len(keys) > 1:  # the data make every rule bite (not a vacuous comparison)
        assert seen["threshold"] > 0
    if kind == "sum" and len(keys) > 1:
        assert seen["p"] > 0 and seen["nk"] > 0
    # the full pipeline releases no cell that ACRO flags
    released = apply_sdc(cells, keys, rules, kind=kind).table
    flagged = flags.select(pl.any_horizontal("fails_threshold", "fails_p", "fails_nk"))
    assert not (flagged.to_series() & (released["status"] == "ok")).any()
