"""Budget: what a dataset has spent and has left (public to everyone signed in)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from sandbox.api.deps import PrincipalDep, RuntimeDep
from sandbox.datasets import catalog
from sandbox.policies.service import document, policy_in_force
from sandbox.privacy import ledger

router = APIRouter(prefix="/v1/budget", tags=["budget"])


@router.get("/{name}", summary="Epsilon spent and left on a dataset")
def budget(name: str, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        dataset = catalog.get_dataset(session, name)
        policy = policy_in_force(session, dataset.id)
        total = document(policy).budget.total_epsilon if policy else 0.0
        spent = ledger.spent(session, dataset.id)
        return {"dataset": name, "total_epsilon": total, "spent_epsilon": spent,
                "left_epsilon": max(0.0, total - spent),
                "your_organisation_spent_epsilon": ledger.spent(session, dataset.id,
                                                                principal.org_id)}
