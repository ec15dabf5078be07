"""Attack catalogue line 44: fuzz every endpoint from the OpenAPI spec → no 5xx, and the
responses match what the spec documents.

* ``test_fuzz_openapi``: schemathesis drives every operation of the app's OpenAPI
  document (except the multipart upload) through the in-process ASGI app, once per role,
  each role on its own home where the demo dataset is registered and its policy approved,
  a second dataset exists, a second policy is drafted and jobs sit in several states.
  Path and query parameters are mixed with real names, versions and job ids, and bodies
  with near-valid query specs, DP-SQL and policy documents, so the fuzzer gets past the
  404s and the schema validation into the code behind them.
* ``test_hostile_inputs``: each class of input that crashed the app once (deep YAML,
  bad YAML dates, huge integers, deeply nested scripts, ids past BIGINT), pinned so it
  does not depend on what the fuzzer happens to draw.
* ``test_upload_malformed``: hand-made broken multipart bodies for ``POST /v1/datasets``
  (4xx, never 5xx, and no upload directory left on tmpfs).
* ``test_no_token_is_401``: every /v1 route without a (valid) token is 401, except the
  few that are public by design (``PUBLIC_V1``).
* ``test_422_body_matches_documented_schema`` and ``test_spec_matches_live_app``: the
  documented validation-error shape, and the document the cases came from.

Deterministic (``derandomize``, fixed seed, no example database) and bounded
(``MAX_EXAMPLES`` per operation and role).
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    import schemathesis
except ImportError:  # a laptop without the test extras; CI must never pass by skipping
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("schemathesis is not installed (pip install -e '.[test]')",
                allow_module_level=True)

from conftest import POLICY_YAML, QUERY, Api, make_home
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from sandbox.api.app import create_app

ROLES = ("owner", "analyst", "reviewer", "admin")
MAX_EXAMPLES = 40
SEED = 20260444  # catalogue line 44

UPLOAD = ("POST", "/v1/datasets")
# Routes that answer without a token by design; every other /v1 route must say 401.
PUBLIC_V1 = {("GET", "/v1/health"), ("GET", "/v1/releases/public-key")}

CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,       # hypothesis derandomize: the same cases every run
        "database": "none",          # no .hypothesis directory, no replay across runs
        "no-shrink": True,           # a failure is reported as found: no minutes of shrinking
        # The role's bearer token is set per call; generated Authorization values would
        # replace it (missing and broken tokens have their own test below).
        "with-security-parameters": False,
        "allow-x00": False,
    },
})


# --------------------------------------------------------------------------------------
# Near-valid inputs: the demo dataset's real names, mutated.
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# The world each role fuzzes: a fresh home per role, kept across that role's operations,
# so one role's deletes and approvals never change what the next role sees.
# --------------------------------------------------------------------------------------

@dataclass
class World:
    api: Api
    names: list[str]                 # dataset names that exist (at the start)
    versions: list[int]              # policy versions of "enterprises"
    job_ids: list[str]               # jobs: released, rejected, pending review, queued


def _build_world(tmp_path: Path, demo_files: tuple[Path, Path]) -> World:
    home = make_home(tmp_path)
    api = Api(home)
    api.register(demo_files)
    api.approve_policy()
    owner, analyst, reviewer = api.as_("owner"), api.as_("analyst"), api.as_("reviewer")
    # A second dataset without a policy: the target for DELETE, and a "no policy" path.
    data, schema = demo_files
    scratch_yaml = re.sub(r"(?m)^name: enterprises$", "name: scratch", schema.read_text())
    with open(data, "rb") as handle:
        response = owner.post("/v1/datasets", data={"schema": scratch_yaml},
                              files={"data": (data.name, handle)})
    assert response.status_code == 201, response.text
    # Policy v2 as a draft (v1 is in force): real versions for approve and diff.
    draft = owner.post("/v1/datasets/enterprises/policies", json={"yaml": POLICY_YAML})
    assert draft.status_code == 201, draft.text
    job_ids = []
    for _ in range(4):
        job = analyst.post("/v1/jobs", json={"kind": "query",
                                             "query": {**QUERY, "epsilon": 0.1}})
        assert job.status_code == 201, job.text
        job_ids.append(job.json()["id"])
    worker = home.worker()
    for _ in range(3):
        assert worker.run_once()
    assert reviewer.post(f"/v1/reviews/{job_ids[0]}/approve").status_code == 200
    assert reviewer.post(f"/v1/reviews/{job_ids[1]}/reject",
                         json={"reason": "fuzz"}).status_code == 200
    return World(api=api, names=list(DATASETS), versions=[1, 2], job_ids=job_ids)


def _openapi_document() -> dict[str, Any]:
    """The OpenAPI document, read at collection from the app of a throwaway home (the
    parametrisation needs it before any fixture runs). ``test_spec_matches_live_app``
    checks it against the app the fuzz runs use."""
    with tempfile.TemporaryDirectory(prefix="sbx-openapi-") as tmp:
        home = make_home(Path(tmp))
        try:
            return create_app(home.runtime).openapi()
        finally:
            home.runtime.close()


OPENAPI = _openapi_document()
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG).exclude(
    method=UPLOAD[0], path=UPLOAD[1])
_ACTIVE: dict[str, World] = {}   # the world the hooks below draw names and ids from


@pytest.fixture(scope="module")
def worlds() -> Iterator[dict[str, World]]:
    built: dict[str, World] = {}
    yield built
    for w in built.values():
        w.api.home.runtime.close()
    _ACTIVE.clear()


@pytest.fixture
def world_for(worlds: dict[str, World], tmp_path_factory: pytest.TempPathFactory,
              demo_files: tuple[Path, Path]) -> Callable[[str], World]:
    def get(role: str) -> World:
        if role not in worlds:
            worlds[role] = _build_world(tmp_path_factory.mktemp(f"fuzz-{role}"), demo_files)
        return worlds[role]
    return get


@pytest.fixture
def world(world_for: Callable[[str], World], role: str) -> World:
    _ACTIVE["world"] = world_for(role)
    return _ACTIVE["world"]


def _mix_body(value: Any, draw: st.DrawFn) -> Any:
    """Swap some ``dataset``/``column``/``group_by`` values for real ones."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "dataset" and isinstance(item, str) and draw(st.booleans()):
                out[key] = draw(st.sampled_from(DATASETS))
            elif key == "column" and isinstance(item, str) and draw(st.booleans()):
                out[key] = draw(st.sampled_from(COLUMNS))
            elif key == "group_by" and isinstance(item, list) and draw(st.booleans()):
                out[key] = draw(st.lists(st.sampled_from(COLUMNS), max_size=3))
            else:
                out[key] = _mix_body(item, draw)
        return out
    if isinstance(value, list):
        return [_mix_body(item, draw) for item in value]
    return value


# Integers past what a database column holds (SQLite and PostgreSQL BIGINT: 2**63 - 1).
INT_EXTREMES = (2**63, -(2**63) - 1, 2**64, 10**30, -1, 0)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@schema.hook
def flatmap_path_parameters(ctx: Any, path_parameters: dict[str, Any]) -> Any:
    if not path_parameters or "world" not in _ACTIVE:
        return st.just(path_parameters)
    w = _ACTIVE["world"]
    # Deleting "enterprises" early would leave the rest of the run with a deleted dataset.
    names = ["scratch"] if ctx.operation.method.upper() == "DELETE" else w.names
    known: dict[str, list[Any]] = {"name": names, "version": w.versions, "job_id": w.job_ids}
    choices = {key: [value, *known.get(key, []), *(INT_EXTREMES if _is_int(value) else ())]
               for key, value in path_parameters.items()}
    return st.fixed_dictionaries({key: st.sampled_from(options)
                                  for key, options in choices.items()})


@schema.hook
def flatmap_query(ctx: Any, query: dict[str, Any] | None) -> Any:
    if not query or "world" not in _ACTIVE:
        return st.just(query)
    versions = _ACTIVE["world"].versions
    choices = {key: [value, *(versions if key.endswith("_version") else ()),
                     *(INT_EXTREMES if _is_int(value) else ())]
               for key, value in query.items()}
    return st.fixed_dictionaries({key: st.sampled_from(options)
                                  for key, options in choices.items()})


@schema.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    if not isinstance(body, dict | list):
        return st.just(body)

    @st.composite
    def mixed(draw: st.DrawFn) -> Any:
        return _mix_body(body, draw)

    near = NEAR_BODIES.get((ctx.operation.method.upper(), ctx.operation.path))
    return st.one_of(mixed(), near()) if near else mixed()


# --------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------

def schema_conformance_except_422(ctx: Any, response: Any, case: Any) -> bool | None:
    """The documented response schema, for every documented status code but 422.

    FastAPI documents 422 as ``HTTPValidationError`` (``detail``: a list of objects) while
    the app's handler answers ``{"detail": "<text>"}``; that one mismatch has its own test
    (``test_422_body_matches_documented_schema``) so that it does not hide the rest here.
    """
    if response.status_code == 422:
        return None
    return response_schema_conformance(ctx, response, case)


def detail_on_4xx(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx is a JSON object with a non-empty ``detail`` the caller can read."""
    if 400 <= response.status_code < 500:
        try:
            body = json.loads(response.content)
        except ValueError as exc:
            raise AssertionError(f"{response.status_code} without a JSON body: "
                                 f"{response.content[:200]!r}") from exc
        assert isinstance(body, dict) and body.get("detail"), \
            f"{response.status_code} without a 'detail': {body!r}"[:400]
    return None


def _describe(case: Any, role: str) -> str:
    text = f"role={role} {case.method} {case.formatted_path}"
    if case.query:
        text += f" query={case.query!r}"
    if case.headers:
        text += f" headers={dict(case.headers)!r}"
    if isinstance(case.body, dict | list | str | bytes | int | float | bool) \
            or case.body is None:
        text += f" body={case.body!r}"
    return text[:3000]


@pytest.mark.parametrize("role", ROLES)
@schema.parametrize()
# ``world`` is built once per role on purpose: state carries over between examples.
@settings(suppress_health_check=list(HealthCheck))
def test_fuzz_openapi(case: Any, role: str, world: World) -> None:
    headers = {"Authorization": f"Bearer {world.api.home.tokens[role]}"}
    try:
        response = case.call(app=world.api.app, headers=headers)
    except Exception as exc:  # an unhandled exception in the app: a 500 in production
        tail = "".join(traceback.format_exception(exc)[-8:])
        raise AssertionError(f"unhandled exception: {_describe(case, role)}\n{tail}") from exc
    case.validate_response(
        response, checks=[not_a_server_error, schema_conformance_except_422, detail_on_4xx],
        headers=headers)


def test_spec_matches_live_app(world_for: Callable[[str], World]) -> None:
    """The document the fuzz cases were generated from is the one a ready app serves."""
    w = world_for("owner")
    served = w.api.as_("owner").get("/openapi.json")
    assert served.status_code == 200
    assert served.json() == OPENAPI


def test_422_body_matches_documented_schema(world_for: Callable[[str], World]) -> None:
    """A validation error has the shape the OpenAPI document declares for 422."""
    w = world_for("analyst")
    op = schema["/v1/queries/compile"]["POST"]
    response = w.api.as_("analyst").post("/v1/queries/compile", json={})
    assert response.status_code == 422
    declared = OPENAPI["paths"]["/v1/queries/compile"]["post"]["responses"]["422"]
    assert op.is_valid_response(response), (
        f"422 body {response.json()!r} does not match the documented "
        f"{declared['content']['application/json']['schema']!r}")


# --------------------------------------------------------------------------------------
# Hostile inputs, by hand: each class the fuzzer found, or that it reaches only by luck
# --------------------------------------------------------------------------------------

_POLICIES = "/v1/datasets/enterprises/policies"
HOSTILE: dict[str, tuple[str, str, str, Any]] = {
    # name: (role, method, path, JSON body or None)
    "policy yaml deeply nested list": ("owner", "POST", _POLICIES,
                                       {"yaml": "[" * 1000 + "]" * 1000}),
    "policy yaml deeply nested map": ("owner", "POST", _POLICIES,
                                      {"yaml": "a: " + "{a: " * 1000 + "1" + "}" * 1000}),
    "policy yaml invalid month": ("owner", "POST", _POLICIES, {"yaml": POLICY_YAML.replace(
        "expires: 2027-12-31", "expires: 2027-13-01")}),
    "policy yaml invalid day elsewhere": ("owner", "POST", _POLICIES,
                                          {"yaml": POLICY_YAML + "\nnote: 2020-02-30\n"}),
    "policy yaml year 0": ("owner", "POST", _POLICIES, {"yaml": POLICY_YAML.replace(
        "expires: 2027-12-31", "expires: 0000-01-01")}),
    "policy yaml invalid hour": ("owner", "POST", _POLICIES, {"yaml": POLICY_YAML.replace(
        "expires: 2027-12-31", "expires: 2027-12-31 25:00:00")}),
    "policy yaml 5000-digit int": ("owner", "POST", _POLICIES, {"yaml": POLICY_YAML.replace(
        "min_group_size: 10", "min_group_size: " + "9" * 5000)}),
    "policy yaml python tag": ("owner", "POST", _POLICIES,
                               {"yaml": "!!python/object/apply:os.system ['true']"}),
    "script deeply nested unary": ("analyst", "POST", "/v1/jobs", {"kind": "script", "script": {
        "dataset": "enterprises", "source": "x = " + "-" * 100_000 + "1"}}),
    "script deeply nested binop": ("analyst", "POST", "/v1/jobs", {"kind": "script", "script": {
        "dataset": "enterprises", "source": "x = 1" + " + 1" * 50_000}}),
    "script 5000-digit int": ("analyst", "POST", "/v1/jobs", {"kind": "script", "script": {
        "dataset": "enterprises", "source": "x = " + "9" * 5000}}),
    "sql deeply nested parentheses": ("analyst", "POST", "/v1/queries/compile", {
        "text": "SELECT COUNT(*) FROM enterprises WHERE " + "(" * 3000 + "city = 'a'"
        + ")" * 3000, "epsilon": 0.1}),
    "sql 5000-digit int": ("analyst", "POST", "/v1/queries/compile", {
        "text": "SELECT COUNT(*) FROM enterprises WHERE employees = " + "9" * 5000,
        "epsilon": 0.1}),
    "json deeply nested": ("analyst", "POST", "/v1/queries/estimate", "[" * 50_000 + "]" * 50_000),
    "policy version 2**63 (approve)": ("owner", "POST", f"{_POLICIES}/{2**63}/approve", None),
    "policy version 2**63 (diff)": ("owner", "GET",
                                    f"{_POLICIES}/diff?from_version={2**63}&to_version=1", None),
    "jobs offset 2**63": ("analyst", "GET", f"/v1/jobs?offset={2**63}", None),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_inputs(world_for: Callable[[str], World], name: str) -> None:
    role, method, path, body = HOSTILE[name]
    client = world_for("hostile").api.as_(role)
    kwargs: dict[str, Any] = {}
    if isinstance(body, str):
        kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
    elif body is not None:
        kwargs = {"json": body}
    try:
        response = client.request(method, path, **kwargs)
    except Exception as exc:
        tail = "".join(traceback.format_exception(exc)[-8:])
        raise AssertionError(f"unhandled exception: role={role} {method} {path} "
                             f"body={str(body)[:200]!r}\n{tail}") from exc
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    assert response.json().get("detail"), response.text[:300]
