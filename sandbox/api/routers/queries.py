"""Query estimate: cost and accuracy of a query before running it (no data, no budget)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from sandbox.api.deps import PrincipalDep, RuntimeDep
from sandbox.datasets import catalog
from sandbox.errors import Conflict
from sandbox.policies.service import document, policy_in_force
from sandbox.privacy import engine
from sandbox.privacy.spec import QuerySpec
from sandbox.privacy.validate import check_query

router = APIRouter(prefix="/v1/queries", tags=["queries"])


@router.post("/estimate", summary="Dry run: cost and 95% interval half-widths")
def estimate(spec: QuerySpec, runtime: RuntimeDep, principal: PrincipalDep) -> dict[str, Any]:
    with runtime.db.transaction() as session:
        dataset = catalog.get_dataset(session, spec.dataset)
        policy = policy_in_force(session, dataset.id)
        if policy is None:
            raise Conflict(f"dataset {dataset.name!r} has no approved policy")
        schema = catalog.schema_of(catalog.latest_version(session, dataset))
        check_query(spec, schema, document(policy))
    return engine.estimate(engine.prepare(spec, schema))
