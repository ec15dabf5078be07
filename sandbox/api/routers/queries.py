"""Query estimate: cost and accuracy of a query before running it (no data, no budget)."""

from __future__ import annotations

from datetime import date
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from sandbox.api.deps import PrincipalDep, RuntimeDep
from sandbox.datasets import catalog
from sandbox.jobs.service import SqlQuery, governing
from sandbox.privacy import engine
from sandbox.privacy.spec import QuerySpec
from sandbox.privacy.sql import compile_sql
from sandbox.privacy.units import Cost
from sandbox.privacy.validate import check_query

router = APIRouter(prefix="/v1/queries", tags=["queries"])


class EstimateRequest(BaseModel):
    """One query spec, or a batch of them (``queries``)."""

    model_config = ConfigDict(extra="forbid")
    queries: list[QuerySpec] = Field(min_length=1, max_length=100)


@router.post("/estimate", summary="Dry run: cost and 95% interval half-widths, no data used")
def estimate(body: QuerySpec | EstimateRequest, runtime: RuntimeDep,
             principal: PrincipalDep) -> dict[str, Any]:
    """Touches neither data nor budget. A batch reports each query and the total cost."""
    specs = body.queries if isinstance(body, EstimateRequest) else [body]
    results = []
    with runtime.db.transaction() as session:
        for spec in specs:
            _dataset, _policy, doc, version = governing(session, principal, spec.dataset,
                                                        date.today())
            schema = catalog.schema_of(version)
            check_query(spec, schema, doc)
            if doc.mode == "sdc":
                results.append({"mode": "sdc", "cost": None, "charged_as": 0.0,
                                "note": "exact aggregates under disclosure control; "
                                        "always reviewed"})
                continue
            estimate = engine.estimate(engine.plan(
                spec, schema, min_group_size=doc.queries.min_group_size))
            estimate["charged_as"] = Cost.of(epsilon=spec.epsilon, rho=spec.rho,
                                             delta=spec.delta).in_unit(doc.budget.unit).amount
            estimate["budget_unit"] = doc.budget.unit
            results.append(estimate)
    if isinstance(body, QuerySpec):
        return results[0]
    return {"estimates": results, "total_charged": sum(r["charged_as"] for r in results)}


@router.post("/compile", summary="Compile DP-SQL to a query spec (no data, no budget)")
def compile_query(body: SqlQuery, principal: PrincipalDep) -> dict[str, Any]:
    """Errors point at the SQL clause (422)."""
    return compile_sql(body.text, epsilon=body.epsilon, rho=body.rho, delta=body.delta,
                       keys=body.keys).model_dump(mode="json")
