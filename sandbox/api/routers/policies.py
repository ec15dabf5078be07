"""Policies: the dataset owner drafts and approves; everyone sees the one in force."""

from __future__ import annotations

import difflib
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from sandbox.api.deps import PrincipalDep, RuntimeDep
from sandbox.api.ownership import can_own_dataset, check_dataset_owner
from sandbox.datasets import catalog
from sandbox.db.models import Policy
from sandbox.errors import NotFound
from sandbox.policies import service

router = APIRouter(prefix="/v1/datasets/{name}/policies", tags=["policies"])
MAX_VERSION = 2**31 - 1


class PolicyDraft(BaseModel):
    model_config = ConfigDict(extra="forbid")
    yaml: str = Field(min_length=1, max_length=200_000, description="The policy document")


def policy_view(policy: Policy) -> dict[str, Any]:
    return {"version": policy.version, "status": policy.status, "yaml": policy.body_yaml,
            "policy": policy.body, "created_at": policy.created_at.isoformat(),
            "approved_at": policy.approved_at.isoformat() if policy.approved_at else None}


@router.post("", status_code=201, summary="Submit a policy draft (owner)")
def draft_policy(name: str, body: PolicyDraft, runtime: RuntimeDep,
                 principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        dataset = catalog.get_dataset(session, name)
        check_dataset_owner(principal, dataset)
        return policy_view(service.submit_draft(session, dataset, body.yaml,
                                                actor_id=principal.user_id))


@router.post("/{version}/approve", summary="Approve a draft; it is in force from now (owner)")
def approve_policy(name: str, version: Annotated[int, Path(ge=1, le=MAX_VERSION)],
                   runtime: RuntimeDep,
                   principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        dataset = catalog.get_dataset(session, name)
        check_dataset_owner(principal, dataset)
        policy = session.scalar(select(Policy).where(Policy.dataset_id == dataset.id,
                                                     Policy.version == version))
        if policy is None:
            raise NotFound(f"policy version {version} of {name!r} not found")
        return policy_view(service.approve(session, policy, actor_id=principal.user_id))


@router.get("/diff", summary="What changed between two policy versions (owner)")
def diff_policies(name: str, from_version: Annotated[int, Query(ge=1, le=MAX_VERSION)],
                  to_version: Annotated[int, Query(ge=1, le=MAX_VERSION)], runtime: RuntimeDep,
                  principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.read() as session:
        dataset = catalog.get_dataset(session, name)
        check_dataset_owner(principal, dataset)
        texts = {}
        for version in (from_version, to_version):
            policy = session.scalar(select(Policy).where(Policy.dataset_id == dataset.id,
                                                         Policy.version == version))
            if policy is None:
                raise NotFound(f"policy version {version} of {name!r} not found")
            texts[version] = policy.body_yaml
    lines = difflib.unified_diff(texts[from_version].splitlines(),
                                 texts[to_version].splitlines(),
                                 f"v{from_version}", f"v{to_version}", lineterm="")
    return {"from_version": from_version, "to_version": to_version, "diff": "\n".join(lines)}


@router.get("", summary="Policies of a dataset: all versions for its owner, else the one "
                        "in force")
def list_policies(name: str, runtime: RuntimeDep,
                  principal: PrincipalDep) -> list[dict[str, Any]]:
    with runtime.db.read() as session:
        dataset = catalog.get_dataset(session, name)
        if can_own_dataset(principal, dataset):
            rows = list(session.scalars(select(Policy).where(Policy.dataset_id == dataset.id)
                                        .order_by(Policy.version)))
        else:
            in_force = service.policy_in_force(session, dataset.id)
            rows = [in_force] if in_force else []
        return [policy_view(p) for p in rows]
