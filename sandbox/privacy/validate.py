"""Data-independent checks of a query against the schema and the policy in force.

Every refusal here is decided from public things only (spec, schema, policy), before
any row is touched, and its message names what is wrong (attack catalogue 23, 24, 30).
"""

from __future__ import annotations

from datetime import date

from sandbox.datasets.schema import ColumnSpec, ColumnType, DatasetSchema
from sandbox.errors import Invalid
from sandbox.policies.model import ColumnUse, PolicyDocument
from sandbox.privacy.spec import QuerySpec
from sandbox.privacy.units import Cost, UnitMismatch

TOLERANCE = 1e-9

_NUMERIC = {ColumnType.INT, ColumnType.FLOAT}


class QueryRefused(Invalid):
    """The query cannot run; the message depends only on public things."""


def check_query(spec: QuerySpec, schema: DatasetSchema, policy: PolicyDocument) -> None:
    """Raise ``QueryRefused`` naming the first problem; return ``None`` if the query may run."""
    _check_cost(spec, policy)
    for agg in spec.aggregates:
        if agg.kind not in policy.queries.kinds:
            raise QueryRefused(f"{agg.kind}: the policy allows only "
                               f"{', '.join(policy.queries.kinds)}")
    if spec.keys == "dp" and not policy.queries.dp_keys:
        raise QueryRefused("keys='dp': the policy does not allow releasing group keys by DP "
                           "thresholding; group by columns with declared key sets")
    for key in spec.group_by:
        column = _column(schema, key, "group_by")
        _allowed(policy, column.classification.value, ColumnUse.GROUP_BY, key, "group_by")
        if spec.keys == "dp" and column.type not in (ColumnType.CATEGORY, ColumnType.STR,
                                                     ColumnType.BOOL):
            raise QueryRefused(f"group_by {key!r}: keys released by DP must be text, category "
                               "or bool columns")
        if spec.keys == "public" and not column.categories and column.type != ColumnType.BOOL:
            raise QueryRefused(f"group_by {key!r}: the owner declared no public key set for "
                               "this column (use keys='dp' if the policy allows it)")
    for flt in spec.filters:
        column = _column(schema, flt.column, "filter")
        _allowed(policy, column.classification.value, ColumnUse.FILTER, flt.column, "filter")
        values = flt.value if isinstance(flt.value, list) else [flt.value]
        for value in values:
            _check_filter_value(column.type, value, flt.column)
    for agg in spec.aggregates:
        if agg.column is None:
            continue
        column = _column(schema, agg.column, agg.kind)
        _allowed(policy, column.classification.value, ColumnUse.AGGREGATE, agg.column, agg.kind)
        if column.type not in _NUMERIC:
            raise QueryRefused(f"{agg.kind}({agg.column}): column is {column.type.value}, "
                               "not numeric")
        if column.bounds is None:
            raise QueryRefused(f"{agg.kind}({agg.column}): the owner declared no bounds")
        if policy.mode == "sdc" and agg.kind in ("quantile", "median", "histogram"):
            raise QueryRefused(f"{agg.kind}: not available under statistical disclosure "
                               "control (an exact quantile is a single record's value)")


def _check_cost(spec: QuerySpec, policy: PolicyDocument) -> None:
    if policy.mode == "sdc":
        if spec.has_cost or spec.keys == "dp":
            raise QueryRefused("this dataset's policy uses statistical disclosure control: "
                               "queries state no epsilon/rho and use the declared keys")
        return
    if not spec.has_cost:
        raise QueryRefused("state the query's privacy cost as epsilon or rho")
    cost = Cost.of(epsilon=spec.epsilon, rho=spec.rho, delta=spec.delta)
    try:
        charge = cost.in_unit(policy.budget.unit)
    except UnitMismatch as exc:
        raise QueryRefused(str(exc)) from None
    budget = policy.budget
    if charge.amount > budget.query_cap + TOLERANCE:
        converted = f" (= {charge.amount:g} {budget.unit})" if charge.converted_from else ""
        raise QueryRefused(f"{cost}{converted} is over the policy's per-job cap of "
                           f"{budget.query_cap:g} {budget.unit}")
    if spec.keys == "dp" and (spec.rho is not None or budget.unit != "epsilon"):
        raise QueryRefused("keys='dp' (thresholding) is available with an epsilon cost on "
                           "an epsilon budget only")
    if charge.delta > budget.total_delta:
        raise QueryRefused(f"delta {charge.delta:g} is over the policy's total delta "
                           f"{budget.total_delta:g}")


def check_grant(policy: PolicyDocument, organisation: str, today: date) -> None:
    """Refuse an organisation that the policy does not grant (or whose grant expired)."""
    if policy.grant_for(organisation, today) is None:
        raise QueryRefused(f"the policy grants no access to organisation {organisation!r}")


def _column(schema: DatasetSchema, name: str, where: str) -> ColumnSpec:
    try:
        column = schema.column(name)
    except KeyError:
        raise QueryRefused(f"{where}: dataset {schema.name!r} has no column {name!r}") from None
    if column.type == ColumnType.DATE:
        raise QueryRefused(f"{where} {name!r}: date columns are not queryable yet")
    return column


def _allowed(policy: PolicyDocument, level: str, use: ColumnUse, name: str, where: str) -> None:
    if level == "L4":
        raise QueryRefused(f"{where} {name!r}: column is classified L4 (core) and is never "
                           "queryable")
    if use not in policy.uses_for(level):
        raise QueryRefused(f"{where} {name!r}: the policy does not allow {use.value} on "
                           f"{level} columns")


def _check_filter_value(column_type: ColumnType, value: object, name: str) -> None:
    ok = {
        ColumnType.INT: isinstance(value, int) and not isinstance(value, bool),
        ColumnType.FLOAT: isinstance(value, int | float) and not isinstance(value, bool),
        ColumnType.BOOL: isinstance(value, bool),
        ColumnType.STR: isinstance(value, str),
        ColumnType.CATEGORY: isinstance(value, str),
        ColumnType.DATE: isinstance(value, str),
    }[column_type]
    if not ok:
        raise QueryRefused(f"filter {name!r}: value {value!r} does not match column type "
                           f"{column_type.value}")
