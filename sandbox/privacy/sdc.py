"""Statistical disclosure control (SDC) for exact aggregates (design §6; attacks 31, 32).

A data owner's policy may release exact counts or sums instead of DP noise; such a
release always goes to human review. Inside the trusted broker, :func:`cell_stats`
turns row-level data into per-cell statistics and :func:`apply_sdc` decides, per cell:

* primary suppression (rules identical to ACRO 1.0.2, the SACRO output checker):
  ``n < threshold`` (frequency); for sums also the p% rule
  ``(total - top1 - top2) / top1 < p/100`` and the n,k dominance rule
  ``(top1 + ... + top_n) / total >= k``;
* secondary suppression, so that no suppressed cell can be recovered exactly from
  marginal totals;
* rounding of what is released.

Where these rules deliberately follow ACRO rather than the textbook wording:

* n,k flags at equality (``>= k``, ACRO ``NKCheck``), not only above ``k``;
* a non-empty cell whose total is 0 fails the p% rule (ACRO ``PPercentCheck``, whose
  ``top1 == 0`` branch compares ``total - top1 - top2 = 0`` with ``p``): every
  contributor is then known to be 0. It does not fail n,k (``0/0`` is not ``>= k``);
* an empty cell (``n == 0``, present when ``complete=True``) fails only the threshold.

Everything is deterministic: no randomness, cells are processed in key order.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import polars as pl

__all__ = ["STATUSES", "SdcResult", "SdcRules", "apply_sdc", "cell_stats", "primary_flags"]

STATUSES = ("ok", "primary:threshold", "primary:p%", "primary:nk", "secondary")
_RESERVED = {"n", "total", "status", "count", "sum"}


@dataclass(frozen=True)
class SdcRules:
    """SDC parameters of a policy; defaults are ACRO's ``default.yaml``.

    * ``threshold``: minimum contributing units per cell (a cell with ``n < threshold``
      is unsafe).
    * ``p_percent``: p of the p% rule, in percent (ACRO's ``safe_pratio_p`` is p/100).
    * ``nk_n``, ``nk_k``: a sum cell whose ``nk_n`` largest contributions make up
      ``nk_k`` or more of its total is unsafe.
    * ``rounding_base``: released counts are rounded to the nearest multiple of this
      base, deterministically, halves to the even multiple (numpy/ACRO ``round_table``;
      a tie needs an even base). 1 disables rounding.
    * ``sum_significant_figures``: released sums are rounded to this many significant
      figures (polars ``round_sig_figs``), so an exact total cannot be differenced
      against other releases to the unit.
    * ``secondary``: run secondary suppression (disable only for a table whose margins
      are never released anywhere; the reviewer is told).
    """

    threshold: int = 10
    p_percent: float = 10.0
    nk_n: int = 2
    nk_k: float = 0.9
    rounding_base: int = 5
    secondary: bool = True
    sum_significant_figures: int = 3

    def __post_init__(self) -> None:
        for name in ("threshold", "nk_n", "rounding_base", "sum_significant_figures"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SdcRules.{name} must be an integer >= 1")
        for name, low, high in (("p_percent", 0.0, 100.0), ("nk_k", 0.0, 1.0)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int | float)
                    or not math.isfinite(value) or not low <= value <= high):
                raise ValueError(f"SdcRules.{name} must be a number in [{low:g}, {high:g}]")
        if self.nk_k == 0.0:
            raise ValueError("SdcRules.nk_k must be a number in (0, 1]")
        if not isinstance(self.secondary, bool):
            raise ValueError("SdcRules.secondary must be a bool")


@dataclass(frozen=True)
class SdcResult:
    """What :func:`apply_sdc` releases to the reviewer.

    ``table``: the key columns, the released value (``count``: Int64, or ``sum``:
    Float64; null where suppressed) and ``status`` (one of :data:`STATUSES`), sorted by
    the keys. ``findings``: plain sentences for the reviewer; they give numbers of
    cells and reasons, never a suppressed (or unrounded) value.
    """

    table: pl.DataFrame
    findings: list[str]

    @property
    def status_counts(self) -> dict[str, int]:
        """Number of cells per status (every status present, zeros included)."""
        counts = dict.fromkeys(STATUSES, 0)
        for status in self.table["status"].to_list():
            counts[status] += 1
        return counts


def cell_stats(frame: pl.DataFrame | pl.LazyFrame, keys: list[str], value: str | None,
               unit: str | None, *, top_n: int = 2, complete: bool = False) -> pl.DataFrame:
    """Exact per-cell statistics of row-level data; runs inside the trusted broker only.

    Returns the key columns, ``n`` (Int64: contributing units; rows when ``unit`` is
    None, else distinct unit ids) and, when ``value`` is given, ``total`` and
    ``top1`` .. ``top{max(2, top_n)}``: the largest per-unit contributions, 0 where the
    cell has fewer units. With ``unit`` the value is first summed per unit within each
    cell, so dominance is measured per contributor, not per row. Null values count as 0
    (as in a pandas sum); negative or non-finite values, and null unit ids, raise
    ``ValueError`` (messages never contain data). With ``complete=True`` every
    combination of the observed key values is present, empty ones with ``n = 0``.
    """
    lazy = frame.lazy()
    schema = lazy.collect_schema()
    if not keys or len(set(keys)) != len(keys):
        raise ValueError("keys must be a non-empty list of distinct column names")
    for name in [*keys, *(c for c in (value, unit) if c is not None)]:
        if name not in schema:
            raise ValueError(f"column {name!r} is not in the frame")
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1:
        raise ValueError("top_n must be an integer >= 1")
    if unit is not None and (unit in keys or unit == value):
        raise ValueError("the unit column must differ from the keys and the value")
    if value is not None and value in keys:
        raise ValueError("the value column must not be a key")
    if unit is not None and lazy.select(pl.col(unit).null_count()).collect().item() > 0:
        raise ValueError(f"unit column {unit!r} has null ids")
    tops = max(2, top_n)
    if value is None:
        n = pl.col(unit).n_unique() if unit is not None else pl.len()
        out = lazy.group_by(keys).agg(n.cast(pl.Int64).alias("n")).collect()
    else:
        dtype = schema[value]
        if not dtype.is_numeric():
            raise ValueError(f"value column {value!r} is not numeric")
        bad = pl.col(value) < 0
        if dtype.is_float():
            bad = bad | pl.col(value).is_infinite() | pl.col(value).is_nan()
        if lazy.select(bad.any()).collect().item():
            raise ValueError(f"value column {value!r} has negative or non-finite values; "
                             "SDC sums need non-negative contributions")
        contrib = pl.col(value).fill_null(0)
        if unit is not None:
            lazy = lazy.group_by([*keys, unit]).agg(contrib.sum().alias("_c"))
        else:
            lazy = lazy.select(*keys, contrib.alias("_c"))
        out = (lazy.group_by(keys)
               .agg(pl.len().cast(pl.Int64).alias("n"), pl.col("_c").sum().alias("total"),
                    pl.col("_c").top_k(tops).alias("_top"))
               .with_columns(pl.col("_top").list.sort(descending=True))
               .with_columns(pl.col("_top").list.get(i, null_on_oob=True).fill_null(0)
                             .alias(f"top{i + 1}") for i in range(tops))
               .drop("_top").collect())
        if dtype.is_float() and not out.select(pl.col("total").is_finite().all()).item():
            raise ValueError(f"the sum of {value!r} overflows in some cell")
    if complete:
        grid = out.select(pl.col(keys[0]).unique())
        for key in keys[1:]:
            grid = grid.join(out.select(pl.col(key).unique()), how="cross")
        fill = [c for c in out.columns if c not in keys]
        out = grid.join(out, on=keys, how="left", nulls_equal=True).with_columns(
            pl.col(c).fill_null(0) for c in fill)
    return out.sort(keys, nulls_last=False)


def primary_flags(cells: pl.DataFrame, keys: list[str], rules: SdcRules, *,
                  kind: Literal["count", "sum"]) -> pl.DataFrame:
    """The cells (validated, sorted by keys) with Boolean ``fails_threshold``,
    ``fails_p`` and ``fails_nk`` columns: each primary rule's verdict on its own (for
    sums a cell may fail several; counts never fail p or n,k)."""
    _validate(cells, keys, rules, kind)
    n = pl.col("n")
    cells = cells.sort(keys, nulls_last=False)
    if kind == "count":
        return cells.with_columns(fails_threshold=n < rules.threshold,
                                  fails_p=pl.lit(False), fails_nk=pl.lit(False))
    top1 = pl.col("top1").cast(pl.Float64)
    rest = (pl.col("total") - pl.col("top1") - pl.col("top2")).cast(pl.Float64)
    p = rules.p_percent / 100.0
    p_ratio = pl.when(top1 > 0).then(rest / top1).otherwise(rest)  # ACRO's top1 == 0 branch
    top_sum = pl.sum_horizontal(pl.col(f"top{i + 1}") for i in range(rules.nk_n))
    total = pl.col("total").cast(pl.Float64)
    return cells.with_columns(
        fails_threshold=n < rules.threshold,
        fails_p=(n > 0) & (p_ratio < p),
        fails_nk=(n > 0) & (total > 0) & (top_sum.cast(pl.Float64) / total >= rules.nk_k))


def apply_sdc(cells: pl.DataFrame, keys: list[str], rules: SdcRules, *,
              kind: Literal["count", "sum"]) -> SdcResult:
    """Primary and secondary suppression plus rounding of one table of exact cells.

    ``cells`` holds one row per cell: the ``keys``, ``n`` and, for ``kind="sum"``,
    ``total`` and ``top1`` .. ``top{max(2, nk_n)}`` (see :func:`cell_stats`). The
    released value is ``n`` for counts and ``total`` for sums.

    Status per cell: the first failing primary rule in the order threshold, p%, n,k;
    then ``secondary``. Secondary suppression assumes an intruder knows every margin
    (each 1-D line of the table: one key -> the table total; two keys -> each row and
    column total), whether or not this release prints them. It is a standard,
    conservative heuristic, not an optimal (minimum-loss) solver:

    1. while some line holds exactly one suppressed cell, also suppress that line's
       smallest safe cell (smallest released value, ties by key order);
    2. for two keys, also while some suppressed cell is a bridge of the row/column graph
       of suppressed cells (then the margins pin it exactly, even with two per line),
       suppress the smallest safe cell that closes a cycle through it.

    With more than two keys only rule 1 is applied, per 1-D line along every key.
    Protection intervals (how narrowly margins and non-negativity bound a suppressed
    cell) are not audited: that is the reviewer's call. A line with a suppressed cell
    and no other cell cannot be protected; findings then say so.
    """
    flagged = primary_flags(cells, keys, rules, kind=kind)
    status_expr = (pl.when("fails_threshold").then(pl.lit("primary:threshold"))
                   .when("fails_p").then(pl.lit("primary:p%"))
                   .when("fails_nk").then(pl.lit("primary:nk")).otherwise(pl.lit("ok")))
    flagged = flagged.with_columns(status_expr.alias("status"))
    status: list[str] = flagged["status"].to_list()
    values: list[float] = flagged["n" if kind == "count" else "total"].cast(pl.Float64).to_list()
    coords: list[tuple[Hashable, ...]] = flagged.select(keys).rows()
    problems: list[str] = []
    if rules.secondary:
        problems = _secondary(status, values, coords)
    statuses = pl.Series("status", status, dtype=pl.String)
    keep = statuses == "ok"
    if kind == "count":
        released = _round_to_base(flagged["n"], rules.rounding_base).alias("count")
    else:
        released = (flagged["total"].cast(pl.Float64)
                    .round_sig_figs(rules.sum_significant_figures).alias("sum"))
    table = flagged.select(keys).with_columns(
        released.zip_with(keep, pl.Series([None] * len(keep), dtype=released.dtype)),
        statuses)
    result = SdcResult(table=table, findings=[])
    result.findings.extend(_findings(result.status_counts, keys, rules, kind, problems))
    return result


def _validate(cells: pl.DataFrame, keys: list[str], rules: SdcRules, kind: str) -> None:
    """Raise ``ValueError`` (naming columns, never values) unless ``cells`` fits the contract."""
    if kind not in ("count", "sum"):
        raise ValueError("kind must be 'count' or 'sum'")
    if not isinstance(rules, SdcRules):
        raise ValueError("rules must be an SdcRules")
    if not keys or len(set(keys)) != len(keys):
        raise ValueError("keys must be a non-empty list of distinct column names")
    tops = [f"top{i + 1}" for i in range(max(2, rules.nk_n))]
    stats = ["n"] if kind == "count" else ["n", "total", *tops]
    for name in keys:
        if name in _RESERVED or name in stats:
            raise ValueError(f"key column {name!r} clashes with a statistic's name")
    missing = [c for c in [*keys, *stats] if c not in cells.columns]
    if missing:
        raise ValueError(f"cells lack column(s) {missing}")
    for name in stats:
        dtype = cells.schema[name]
        if not dtype.is_numeric() or (name == "n" and not dtype.is_integer()):
            raise ValueError(f"column {name!r} must be {'integer' if name == 'n' else 'numeric'}")
        col = pl.col(name)
        bad = col.is_null() | (col < 0)
        if dtype.is_float():
            bad = bad | ~col.is_finite()
        if cells.select(bad.any()).item():
            raise ValueError(f"column {name!r} has null, negative or non-finite entries")
    if kind == "sum":
        for upper, lower in pairwise(tops):
            if cells.select((pl.col(lower) > pl.col(upper)).any()).item():
                raise ValueError(f"column {lower!r} exceeds {upper!r} in some cell")
    if cells.select(pl.struct(keys).is_duplicated().any()).item():
        raise ValueError("cells has duplicate key combinations")


def _round_to_base(counts: pl.Series, base: int) -> pl.Series:
    """Nearest multiple of ``base``, halves to the even multiple; exact integer arithmetic."""
    counts = counts.cast(pl.Int64)
    q, r = counts // base, counts % base
    up = (2 * r > base) | ((2 * r == base) & (q % 2 == 1))
    return (q + up.cast(pl.Int64)) * base


def _secondary(status: list[str], values: list[float],
               coords: list[tuple[Hashable, ...]]) -> list[str]:
    """Mark secondary suppressions in ``status`` in place; return unsolved problems."""
    dims = len(coords[0]) if coords else 0
    lines: list[list[int]] = []  # each 1-D line: cells sharing all keys but one
    for d in range(dims):
        groups: dict[tuple[Hashable, ...], list[int]] = defaultdict(list)
        for i, coord in enumerate(coords):
            groups[coord[:d] + coord[d + 1:]].append(i)
        lines.extend(groups[g] for g in sorted(groups, key=lambda g: groups[g][0]))

    def cheapest(candidates: list[int]) -> int | None:
        safe = [i for i in candidates if status[i] == "ok"]
        return min(safe, key=lambda i: (values[i], i)) if safe else None

    stuck: set[int] = set()  # bridges no safe cell can close a cycle through
    changed = True
    while changed:
        changed = False
        for line in lines:
            hidden = [i for i in line if status[i] != "ok"]
            if len(hidden) == 1 and (pick := cheapest(line)) is not None:
                status[pick] = "secondary"
                changed = True
        if not changed and dims == 2:
            for bridge, near, far in _bridges(status, coords):
                if bridge in stuck:
                    continue
                pick = cheapest([i for i, (r, c) in enumerate(coords)
                                 if ((0, r) in near and (1, c) in far)
                                 or ((0, r) in far and (1, c) in near)])
                if pick is None:
                    stuck.add(bridge)
                    continue
                status[pick] = "secondary"
                changed = True
                break
    problems = []
    lonely = sum(1 for line in lines if sum(status[i] != "ok" for i in line) == 1)
    if lonely:
        problems.append(f"{lonely} line(s) of the table hold one suppressed cell and no safe "
                        "cell to pair it with: do not release those marginal totals")
    derivable = sum(1 for _ in _bridges(status, coords)) if dims == 2 else 0
    if derivable:
        problems.append(f"{derivable} suppressed cell(s) stay derivable from the row and "
                        "column totals: release no margins of this table")
    return problems


def _bridges(status: list[str], coords: list[tuple[Hashable, ...]]
             ) -> Iterator[tuple[int, set[tuple[int, Hashable]], set[tuple[int, Hashable]]]]:
    """Suppressed cells that are bridges in the bipartite row/column graph of suppressed
    cells (pinned exactly by the margins), each with the node sets on its two sides; in
    cell order, lazily."""
    edges = [i for i, s in enumerate(status) if s != "ok"]
    adjacency: dict[tuple[int, Hashable], list[tuple[tuple[int, Hashable], int]]] = (
        defaultdict(list))
    for i in edges:
        row, col = (0, coords[i][0]), (1, coords[i][1])
        adjacency[row].append((col, i))
        adjacency[col].append((row, i))

    def side(start: tuple[int, Hashable], banned: int) -> set[tuple[int, Hashable]]:
        seen, todo = {start}, [start]
        while todo:
            for nxt, edge in adjacency[todo.pop()]:
                if edge != banned and nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    for i in edges:
        row, col = (0, coords[i][0]), (1, coords[i][1])
        near = side(row, i)
        if col not in near:
            yield i, near, side(col, i)


def _findings(counts: dict[str, int], keys: list[str], rules: SdcRules, kind: str,
              problems: list[str]) -> list[str]:
    """Reviewer notes: numbers of cells and reasons, never a value."""
    total = sum(counts.values())
    hidden = total - counts["ok"]
    reasons = ", ".join(f"{counts[s]} {s}" for s in STATUSES[1:] if counts[s])
    out = [f"SDC {kind} table over {keys}: {total} cell(s), {hidden} suppressed"
           + (f" ({reasons})." if reasons else "."),
           f"Rules: threshold {rules.threshold} units; "
           + (f"p% rule p={rules.p_percent:g}; n,k rule n={rules.nk_n} k={rules.nk_k:g}; "
              if kind == "sum" else "")
           + (f"released counts rounded to the nearest multiple of {rules.rounding_base} "
              "(halves to even)."
              if kind == "count" else
              f"released sums rounded to {rules.sum_significant_figures} significant figures.")]
    if rules.secondary:
        out.append("Secondary suppression is a conservative heuristic (not an optimal "
                   "solver) against exact recovery from marginal totals; protection "
                   "intervals are not audited.")
    elif hidden:
        out.append("Secondary suppression is OFF: suppressed cells may be recoverable from "
                   "any released total.")
    out.extend(problems)
    out.append("Exact aggregates: a human reviewer must approve this release; check it "
               "against linked tables (same cells released elsewhere) for differencing.")
    return out
