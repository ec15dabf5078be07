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

_NUMERIC = {ColumnType.INT, ColumnType.FLOAT}


class QueryRefused(Invalid):
    """The query cannot run; the message depends only on public things."""


def check_query(spec: QuerySpec, schema: DatasetSchema, policy: PolicyDocument) -> None:
    """Raise ``QueryRefused`` naming the first problem; return ``None`` if the query may run."""
    if spec.epsilon > policy.budget.per_job_epsilon:
        raise QueryRefused(f"epsilon {spec.epsilon} is over the policy's per-job cap of "
                           f"{policy.budget.per_job_epsilon}")
    for key in spec.group_by:
        column = _column(schema, key, "group_by")
        _allowed(policy, column.classification.value, ColumnUse.GROUP_BY, key, "group_by")
        if not column.categories and column.type != ColumnType.BOOL:
            raise QueryRefused(f"group_by {key!r}: the owner declared no public key set for "
                               "this column")
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
