"""Policy documents: validation naming the field; versions, approval, supersession."""

from __future__ import annotations

import pytest
from conftest import POLICY_YAML, Api

from sandbox.policies.model import PolicyDocument, PolicyError


def test_example_policy_parses() -> None:
    doc = PolicyDocument.from_yaml(POLICY_YAML)
    assert doc.budget.total == 5.0 and doc.budget.unit == "epsilon" and doc.review_required
    assert doc.uses_for("L4") == ()


@pytest.mark.parametrize(("mutation", "message"), [
    ({"budget": {"total": -1, "per_job": 1}}, "budget.total"),
    ({"budget": {"total": 1, "per_job": 2}}, "per_job cannot exceed"),
    ({"budget": {"total": float("nan"), "per_job": 1}}, "budget.total"),
    ({"budget": {"total": 1, "per_job": 1, "unit": "delta"}}, "budget.unit"),
    ({"mode": "sdc", "review_required": False}, "SDC outputs always go to human review"),
    ({"queries": {"dp_keys": True}, "budget": {"total": 1, "per_job": 1}}, "total_delta"),
    ({"grants": []}, "grants"),
    ({"classification": {"L4": ["filter"]}}, "L4"),
    ({"surprise": 1}, "surprise"),
])
def test_bad_policies_name_the_field(mutation: dict, message: str) -> None:
    import yaml
    raw = yaml.safe_load(POLICY_YAML) | mutation
    with pytest.raises(PolicyError, match=message):
        PolicyDocument.from_yaml(yaml.safe_dump(raw))


def test_not_yaml() -> None:
    with pytest.raises(PolicyError, match="YAML"):
        PolicyDocument.from_yaml("a: [unclosed")


def test_versions_and_supersession(api: Api, demo_files) -> None:
    api.register(demo_files)
    first = api.approve_policy()
    second = api.approve_policy(POLICY_YAML.replace("total: 5.0", "total: 3.0"))
    assert (first["version"], second["version"]) == (1, 2)
    listed = api.as_("owner").get("/v1/datasets/enterprises/policies").json()
    assert [p["status"] for p in listed] == ["superseded", "approved"]
    seen_by_analyst = api.as_("analyst").get("/v1/datasets/enterprises/policies").json()
    assert [p["version"] for p in seen_by_analyst] == [2]
    again = api.as_("owner").post("/v1/datasets/enterprises/policies/1/approve")
    assert again.status_code == 409


def test_policy_for_another_dataset_name_is_refused(api: Api, demo_files) -> None:
    api.register(demo_files)
    response = api.as_("owner").post("/v1/datasets/enterprises/policies",
                                     json={"yaml": POLICY_YAML.replace("dataset: enterprises",
                                                                       "dataset: other")})
    assert response.status_code == 422 and "policy.dataset" in response.json()["detail"]


def test_ungranted_organisation_is_refused(api: Api, demo_files) -> None:
    from conftest import QUERY
    api.register(demo_files)
    api.approve_policy(POLICY_YAML.replace("suzhou-analytics", "someone-else"))
    response = api.as_("analyst").post("/v1/jobs", json={"query": QUERY})
    assert response.status_code == 422 and "grants no access" in response.json()["detail"]
