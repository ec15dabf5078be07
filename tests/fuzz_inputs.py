"""Near-valid inputs for the API fuzzer (``test_api_fuzz.py``): query specs, DP-SQL,
job submissions and policy documents that are right but for a step drawn now and then,
so the fuzzer gets past schema validation into the code behind it."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import yaml
from conftest import POLICY_YAML
from hypothesis import strategies as st

DATASETS = ("enterprises", "scratch")
CATEGORY_COLUMNS = ("city", "industry")
NUMERIC_COLUMNS = ("employees", "annual_revenue", "tax_paid", "founded_year")
COLUMNS = (*CATEGORY_COLUMNS, *NUMERIC_COLUMNS, "enterprise_id", "nope")
CATEGORIES = ("Nanjing", "Suzhou", "manufacturing", "finance", "nowhere")

_odd_floats = st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e308, -1e308, 2.0**53 + 1, 0.5])
_numbers = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False,
                                                              allow_infinity=False), _odd_floats)
_scalar = st.one_of(st.sampled_from(CATEGORIES), _numbers, st.booleans(), st.text(max_size=12))
_small_epsilon = st.one_of(st.sampled_from([1e-3, 0.01, 0.05]), st.floats(1e-3, 0.05))


def _rarely(draw: st.DrawFn) -> bool:
    """True about one time in sixteen: a step that makes a near-valid input invalid. (Not
    ``== 0``: hypothesis favours the ends of a range.)"""
    return draw(st.integers(0, 15)) == 7


@st.composite
def _aggregate(draw: st.DrawFn, index: int) -> dict[str, Any]:
    kind = draw(st.sampled_from(["count", "sum", "mean", "quantile", "median", "histogram"]))
    agg: dict[str, Any] = {"kind": kind, "alias": f"a{index}"}
    if _rarely(draw):
        agg["alias"] = draw(st.one_of(st.just("a0"), st.just("city"), st.text(max_size=3)))
    elif draw(st.booleans()):
        del agg["alias"]
    if (kind != "count") != _rarely(draw):
        agg["column"] = draw(st.sampled_from(COLUMNS if _rarely(draw) else NUMERIC_COLUMNS))
    if (kind == "quantile") != _rarely(draw):
        agg["q"] = draw(_numbers if _rarely(draw) else st.one_of(
            st.floats(0, 1, exclude_min=True, exclude_max=True),
            st.sampled_from([1e-300, 1 - 1e-16, 0.5])))
    if (kind == "histogram") != _rarely(draw):
        edges = st.floats(-1e6, 1e6) if draw(st.booleans()) else _numbers
        agg["bins"] = sorted(set(draw(st.lists(edges, min_size=2, max_size=40))))
        if _rarely(draw):
            agg["bins"].reverse()
    return agg


@st.composite
def near_query(draw: st.DrawFn) -> dict[str, Any]:
    """A query spec that is valid, or one or two steps from valid."""
    spec: dict[str, Any] = {
        "dataset": "scratch" if _rarely(draw) else "enterprises",
        "aggregates": [draw(_aggregate(i)) for i in range(draw(st.integers(1, 4)))],
    }
    if draw(st.booleans()):
        filters = []
        for _ in range(draw(st.integers(1, 3))):
            column = draw(st.sampled_from(COLUMNS if _rarely(draw) else CATEGORY_COLUMNS))
            op = draw(st.sampled_from(["==", "!=", "<", "<=", ">", ">=", "in", "not_in"]))
            one = _scalar if _rarely(draw) else (
                st.sampled_from(CATEGORIES) if column in CATEGORY_COLUMNS else _numbers)
            listed = op in ("in", "not_in")
            if _rarely(draw):
                listed = not listed
            value = draw(st.lists(one, min_size=1, max_size=5)) if listed else draw(one)
            filters.append({"column": column, "op": op, "value": value})
        spec["filters"] = filters
    if draw(st.booleans()):
        spec["group_by"] = draw(st.lists(st.sampled_from(COLUMNS if _rarely(draw)
                                                         else CATEGORY_COLUMNS),
                                         min_size=1, max_size=2, unique=True))
        if _rarely(draw) or draw(st.integers(0, 3)) == 0:
            spec["keys"] = "dp"
            spec["delta"] = draw(_numbers if _rarely(draw) else
                                 st.sampled_from([1e-9, 1e-7, 1e-6]))
    cost = "rho" if _rarely(draw) else "epsilon"
    if not _rarely(draw):
        spec[cost] = draw(_numbers if _rarely(draw) else _small_epsilon)
    return spec


_SQL_AGGS = ("COUNT(*)", "SUM({n})", "AVG({n})", "MEDIAN({n})",
             "PERCENTILE_CONT({q}) WITHIN GROUP (ORDER BY {n})", "QUANTILE({n}, {q})",
             "APPROX_QUANTILE({n}, {q})")
_SQL_AGGS_REFUSED = ("COUNT({c})", "MAX({n})", "SUM({n} + 1)", "COUNT(DISTINCT {c})",
                     "SUM({v})", "AVG(*)", "QUANTILE({n})")
_SQL_CONDS = ("{k} = {v}", "{k} <> {v}", "{v} != {k}", "{k} IN ({v}, {v})", "{k} NOT IN ({v})",
              "({k} = {v} AND {k} != {v})")
_SQL_CONDS_REFUSED = ("{n} BETWEEN {x} AND {x}", "{x} < {n}", "{c} IS NULL", "{c} LIKE {v}",
                      "{c} = {v} OR {c} = {v}", "{n} = {n}", "NOT {c} = {v}", "{c} = {x}")
_SQL_CATEGORY_LITERALS = ("'Nanjing'", "'Suzhou'", "'manufacturing'", "'it''s'", "''",
                          "'\u00e9\u4e2d'")
_SQL_LITERALS = ("1", "-1", "1.5", "1e999", "99999999999999999999999", "TRUE", "NULL",
                 "-0.0", "0x10", "'1'")


@st.composite
def near_sql(draw: st.DrawFn) -> str:
    """DP-SQL from the supported grammar, one or two steps from valid, sometimes cut."""
    def fill(template: str) -> str:
        return template.format(c=draw(st.sampled_from(COLUMNS)),
                               k=draw(st.sampled_from(CATEGORY_COLUMNS)),
                               n=draw(st.sampled_from(NUMERIC_COLUMNS)),
                               q=draw(st.sampled_from(["0.5", "0.9", "0", "1", "-1", "1e-300"])),
                               v=draw(st.sampled_from(_SQL_CATEGORY_LITERALS)),
                               x=draw(st.sampled_from(_SQL_LITERALS)))
    group = draw(st.lists(st.sampled_from(CATEGORY_COLUMNS), max_size=2, unique=True))
    if _rarely(draw):
        group.append(draw(st.sampled_from(COLUMNS)))
    aggs = [draw(st.sampled_from(_SQL_AGGS_REFUSED if _rarely(draw) else _SQL_AGGS))
            for _ in range(draw(st.integers(1, 3)))]
    items = [*group, *(fill(a) + f" AS a{i}" for i, a in enumerate(aggs))]
    table = draw(st.sampled_from(("x.y", "scratch", "(SELECT 1)"))) if _rarely(draw) \
        else "enterprises"
    sql = f"SELECT {', '.join(items)} FROM {table}"
    conditions = [fill(draw(st.sampled_from(_SQL_CONDS_REFUSED if _rarely(draw)
                                            else _SQL_CONDS)))
                  for _ in range(draw(st.integers(0, 3)))]
    if conditions:
        sql += " WHERE " + " AND ".join(conditions)
    if group:
        sql += " GROUP BY " + ", ".join(group)
    if _rarely(draw):
        sql += draw(st.sampled_from(["; SELECT 1", " LIMIT 5", " ORDER BY 1", " --", ";;",
                                     " HAVING COUNT(*) > 1", " UNION SELECT 1"]))
    elif draw(st.booleans()):
        sql += ";"
    if _rarely(draw):   # cut at a random point
        sql = sql[:draw(st.integers(1, len(sql)))]
    return sql


SCRIPT_SOURCES = ("print(1)", "import os\nos.system('id')", "(", "\x00", "x" * 1000,
                  "x = " + "(" * 300 + ")" * 300, "x = " + "-" * 100_000 + "1",
                  "x = 1" + " + 1" * 50_000, "x = " + "9" * 5000)


@st.composite
def near_job(draw: st.DrawFn) -> dict[str, Any]:
    shape = draw(st.sampled_from(["query", "query", "sql", "script"]))
    if shape == "query":
        return {"kind": "query", "query": draw(near_query())}
    if shape == "sql":
        sql: dict[str, Any] = {"text": draw(near_sql())}
        if not _rarely(draw):
            sql["rho" if _rarely(draw) else "epsilon"] = draw(_numbers if _rarely(draw)
                                                              else _small_epsilon)
        if _rarely(draw) or ("GROUP BY" in sql["text"] and draw(st.integers(0, 3)) == 1):
            sql["keys"] = "dp"
            sql["delta"] = draw(_numbers if _rarely(draw) else st.sampled_from([1e-7, 1e-6]))
        return {"kind": "query", "sql": sql}
    return {"kind": "script", "script": {
        "dataset": draw(st.sampled_from(DATASETS)),
        "source": draw(st.sampled_from(SCRIPT_SOURCES)),
        "mode": draw(st.sampled_from(["real", "mock"]))}}


_POLICY = yaml.safe_load(POLICY_YAML)
_POLICY_EXTRAS = {"approvals": 2, "mode": "sdc", "sdc": {"threshold": 5},
                  "scripts": {"wall_seconds": 10}, "timing_quantum_ms": 100}


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path


_POLICY_LEAVES = list(_leaves(_POLICY))
_yaml_values = st.one_of(_scalar, st.none(), st.lists(_scalar, max_size=3),
                         st.dictionaries(st.text(max_size=5), _scalar, max_size=2),
                         st.sampled_from(["2020-01-01", "9999-12-31", "not-a-date", "rho",
                                          "sdc", "L4", "group_by"]))


@st.composite
def near_policy(draw: st.DrawFn) -> str:
    """The demo policy with a few fields changed, added or dropped, as YAML."""
    doc = copy.deepcopy(_POLICY)
    doc.update({k: v for k, v in _POLICY_EXTRAS.items() if draw(st.integers(0, 4)) == 3})
    for _ in range(draw(st.integers(0, 3))):
        path = draw(st.sampled_from(_POLICY_LEAVES))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.integers(0, 4)) == 0:
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(_yaml_values)
        except (KeyError, IndexError, TypeError):
            continue
    if _rarely(draw):
        doc["dataset"] = "scratch"
    text = yaml.safe_dump(doc, allow_unicode=True)
    if _rarely(draw):   # cut at a random point
        text = text[:draw(st.integers(1, len(text)))]
    return text


# Which near-valid generator fits which operation's body.
NEAR_BODIES: dict[tuple[str, str], Callable[[], st.SearchStrategy[Any]]] = {
    ("POST", "/v1/jobs"): near_job,
    ("POST", "/v1/queries/estimate"): lambda: st.one_of(
        near_query(), st.builds(lambda qs: {"queries": qs},
                                st.lists(near_query(), min_size=1, max_size=3))),
    ("POST", "/v1/queries/compile"): lambda: st.builds(
        lambda text, eps: {"text": text, "epsilon": eps}, near_sql(),
        st.one_of(_small_epsilon, _small_epsilon, _small_epsilon, _numbers)),
    ("POST", "/v1/datasets/{name}/policies"): lambda: st.builds(
        lambda text: {"yaml": text}, near_policy()),
}
