"""Budget: what a dataset and your organisation have spent and have left."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from sandbox.api.deps import PrincipalDep, RuntimeDep
from sandbox.datasets import catalog
from sandbox.policies.service import document, policy_in_force
from sandbox.privacy import ledger

router = APIRouter(prefix="/v1/budget", tags=["budget"])


@router.get("/{name}", summary="Budget spent and left on a dataset, in the policy's unit")
def budget(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.read() as session:
        dataset = catalog.get_dataset(session, name)
        policy = policy_in_force(session, dataset.id)
        budget = document(policy).budget if policy else None
        return {"dataset": name, **ledger.summary(session, dataset.id, budget,
                                                  principal.org_id)}
