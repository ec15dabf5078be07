"""DP-SQL: compile a small SQL subset to a ``QuerySpec``.

The SQL is parsed with sqlglot (PostgreSQL dialect) and its syntax tree is walked; it is
never executed and no SQL is ever built from it. The result is an ordinary validated
``QuerySpec``, so SQL grants nothing that the JSON spec does not. Supported subset::

    SELECT <group-by columns and aggregates>
    FROM <dataset>
    [WHERE <condition> [AND <condition> ...]]
    [GROUP BY <column> [, <column> ...]]

- Exactly one statement (a trailing ``;`` is fine). The table name is the dataset; it may
  not be schema-qualified or aliased.
- Identifiers are lower-cased unless double-quoted; quoted identifiers keep their case.
  A column may be qualified with the dataset name (``enterprises.city``).
- Select items are GROUP BY columns (not renamed) and aggregates, each with an optional
  ``AS alias``: ``COUNT(*)`` (count), ``SUM(col)``, ``AVG(col)`` (mean), ``MEDIAN(col)``,
  ``PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY col)``, ``QUANTILE(col, q)`` and
  ``APPROX_QUANTILE(col, q)`` (quantile ``q``). ``COUNT(col)`` is refused: nulls are
  imputed by the engine, so write ``COUNT(*)``. A GROUP BY column need not be selected:
  the result always has one column per GROUP BY key, as with the JSON spec. A selected
  plain column must be in GROUP BY.
- WHERE is a conjunction (AND, parentheses allowed) of ``col op literal`` with op one of
  ``= != <> < <= > >=`` (``5 < col`` is read as ``col > 5``), ``col IN (...)``,
  ``col NOT IN (...)`` and ``col BETWEEN a AND b`` (two filters, ``>=`` and ``<=``).
  Literals: strings, integers, decimals, ``TRUE``/``FALSE``, negative numbers.
- Everything else is refused with a ``SqlError`` naming the clause and quoting the
  fragment: ``SELECT *``, DISTINCT, expressions, other functions, window functions,
  subqueries, WITH, UNION, JOIN, HAVING, ORDER BY, LIMIT/OFFSET, OR, NOT (but NOT IN),
  IS NULL, LIKE, casts, column-to-column comparisons.
"""

from __future__ import annotations

import re
from math import isfinite
from typing import Any, NoReturn, TypeVar

import sqlglot
from pydantic import BaseModel, ValidationError
from sqlglot import exp
from sqlglot.errors import ParseError, SqlglotError, TokenError

from sandbox.errors import Invalid
from sandbox.privacy.spec import Aggregate, Filter, QuerySpec, Scalar

MAX_SQL_LENGTH = 20_000
_DIALECT = "postgres"
_FRAGMENT = 60
_INT64 = 2**63
_AGGREGATES = "COUNT, SUM, AVG, MEDIAN, PERCENTILE_CONT, QUANTILE"
_FORM = "use column op literal, IN, NOT IN or BETWEEN, combined with AND"
_COMPARISONS: dict[type[exp.Expr], str] = {
    exp.EQ: "==", exp.NEQ: "!=", exp.LT: "<", exp.LTE: "<=", exp.GT: ">", exp.GTE: ">=",
}
_FLIPPED = {"==": "==", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}
_SIMPLE: dict[type[exp.Expr], tuple[str, str]] = {
    exp.Sum: ("sum", "SUM"), exp.Avg: ("mean", "AVG"), exp.Median: ("median", "MEDIAN")}
_SELECT_ARGS = {"expressions", "from", "from_", "where", "group"}
_JOIN = "JOIN is not supported; query one dataset"
_MODIFIERS = {  # Select args -> (clause, message); others: "<ARG> is not supported"
    "with": ("WITH", "CTEs (WITH) are not supported"), "joins": ("FROM", _JOIN),
    "distinct": ("SELECT", "DISTINCT is not supported"), "locks": ("FOR UPDATE", ""),
    "having": ("HAVING", "HAVING is not supported; filter the released result instead"),
    "order": ("ORDER BY", "ORDER BY is not supported; sort the released result instead"),
    "windows": ("WINDOW", "window functions are not supported"), "sample": ("TABLESAMPLE", ""),
    "laterals": ("FROM", "LATERAL is not supported"),
}
_TABLE_ARGS = {"db": "schema-qualified names are not supported; name the dataset alone",
               "alias": "table aliases are not supported", "joins": _JOIN}
_NOT_AGGREGATES: list[tuple[type[exp.Expr] | tuple[type[exp.Expr], ...], str]] = [
    (exp.Window, "window functions (OVER) are not supported"),
    (exp.Filter, "FILTER on an aggregate is not supported; use WHERE"),
    ((exp.Subquery, exp.Select), "subqueries are not supported")]
_NOT_CONDITIONS: list[tuple[type[exp.Expr] | tuple[type[exp.Expr], ...], str]] = [
    (exp.Or, "OR is not supported; combine conditions with AND"),
    (exp.Is, "IS [NOT] NULL is not supported (every filter drops null rows)"),
    ((exp.Like, exp.ILike, exp.SimilarTo, exp.RegexpLike),
     "LIKE and pattern matching are not supported; use = or IN"),
    ((exp.Subquery, exp.Select, exp.Exists), "subqueries are not supported"),
    (exp.Column, "a bare column is not a condition; write column = TRUE")]
_TOKEN = re.compile(r"<Token token_type: [^,]*, text: (.*?), line: \d+, col: \d+, "
                    r"start: \d+, end: \d+, comments: .*?>|<class '(?:\w+\.)*(\w+)'>")
_M = TypeVar("_M", bound=BaseModel)


class SqlError(Invalid):
    """The SQL is malformed or outside the supported subset; the message names the clause
    and quotes the offending fragment."""


def compile_sql(sql: str, *, epsilon: float | None = None, rho: float | None = None,
                delta: float | None = None, keys: str = "public") -> QuerySpec:
    """Compile one DP-SQL ``SELECT`` to a validated ``QuerySpec`` or raise ``SqlError``.

    The privacy cost (``epsilon`` or ``rho``, ``delta``) and ``keys`` are not part of the
    SQL; they are passed through to the spec unchanged.
    """
    if not isinstance(sql, str):
        raise SqlError("the query must be a string of SQL")
    if len(sql) > MAX_SQL_LENGTH:
        raise SqlError(f"the query is longer than {MAX_SQL_LENGTH} characters")
    try:
        statements = [s for s in _parse(sql) if s is not None]
        if not statements:
            raise SqlError("empty query: write one SELECT statement")
        if len(statements) > 1:
            raise SqlError(f"only one statement is allowed, found {len(statements)} "
                           f'(at "{_fragment(statements[1])}")')
        select = _select(statements[0])
        dataset = _dataset(select)
        group_by = _group_by(select, dataset)
        aggregates = _select_list(select, group_by, dataset)
        filters = _where(select, dataset)
        fields: dict[str, Any] = {
            "dataset": dataset, "filters": tuple(filters), "group_by": group_by,
            "aggregates": tuple(aggregates), "keys": keys, "epsilon": epsilon, "rho": rho,
            "delta": delta}
    except RecursionError:
        raise SqlError("the query is nested too deeply") from None
    try:
        return QuerySpec(**fields)
    except ValidationError as error:
        raise SqlError(_explain(error, spec=True)) from None


def _parse(sql: str) -> list[exp.Expr | None]:
    try:
        return list(sqlglot.parse(sql, read=_DIALECT))
    except ParseError as error:
        info = error.errors[0] if error.errors else {}
        description = _TOKEN.sub(lambda m: f'"{m.group(1)}"' if m.group(1) else m.group(2),
                                 info.get("description") or "")
        line, col = info.get("line"), info.get("col")
        where = f" at line {line}, column {col}" if line and col else ""
        raise SqlError(f"syntax error{where}: {description or error}") from None
    except TokenError as error:
        cause = str(error.__cause__ or error)
        found = re.search(r"from (\d+):(\d+)$", cause)
        if found is None:
            raise SqlError(f"syntax error: {cause}") from None
        offset = min(int(found.group(2)), len(sql))
        line = sql.count("\n", 0, offset) + 1
        col = offset - (sql.rfind("\n", 0, offset) + 1) + 1
        message = re.sub(r"^Missing (\S+) from .*$", r"unterminated \1", cause)
        raise SqlError(f"syntax error at line {line}, column {col}: {message}") from None
    except SqlglotError as error:
        raise SqlError(f"syntax error: {error}") from None


def _fragment(node: exp.Expr) -> str:
    try:
        text = " ".join(node.sql(dialect=_DIALECT).split())
    except Exception:  # a fragment is a courtesy; never fail on it
        text = type(node).__name__
    return text if len(text) <= _FRAGMENT else text[: _FRAGMENT - 3] + "..."


def _fail(clause: str, message: str, node: exp.Expr | None = None) -> NoReturn:
    at = f' (at "{_fragment(node)}")' if node is not None else ""
    raise SqlError(f"{clause}: {message}{at}")


def _build(model: type[_M], clause: str, node: exp.Expr, **fields: Any) -> _M:
    try:
        return model(**fields)
    except ValidationError as error:
        _fail(clause, _explain(error), node)


def _explain(error: ValidationError, spec: bool = False) -> str:
    """Readable pydantic errors; for the whole spec, each prefixed with its clause."""
    clauses = {"dataset": "FROM", "filters": "WHERE", "group_by": "GROUP BY",
               "aggregates": "SELECT", "aggregate": "SELECT"}
    parts = []
    for item in error.errors():
        message = str(item["msg"]).removeprefix("Value error, ")
        field = next((str(x) for x in item.get("loc") or () if isinstance(x, str)), "")
        if spec:
            key = field or next((k for k in ("aggregate", "group_by") if k in message), "")
            clause = clauses.get(key, "query")
            parts.append(f"{clause}: {field}: {message}" if clause == "query" and field
                         else f"{clause}: {message}")
        else:
            parts.append(f"{field}: {message}" if field else message)
    return "; ".join(parts)


def _unwrap(node: exp.Expr) -> exp.Expr:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _select(statement: exp.Expr) -> exp.Select:
    if isinstance(statement, exp.SetOperation):
        _fail(statement.key.upper(), "set operations (UNION, INTERSECT, EXCEPT) are not "
              "supported; write one SELECT", statement)
    if isinstance(statement, exp.Subquery):
        _fail("SELECT", "write the SELECT without enclosing parentheses", statement)
    if not isinstance(statement, exp.Select):
        keyword = str(statement.this) if isinstance(statement, exp.Command) else statement.key
        _fail(keyword.upper(), "only SELECT statements are supported", statement)
    for key, value in statement.args.items():
        if key in _SELECT_ARGS or not value:
            continue
        name = key.rstrip("_")
        clause, message = _MODIFIERS.get(name, (name.replace("_", " ").upper(), ""))
        node = value[0] if isinstance(value, list) else value
        _fail(clause, message or f"{clause} is not supported",
              node if isinstance(node, exp.Expr) else None)
    return statement


def _name(identifier: exp.Expr | None, clause: str, node: exp.Expr) -> str:
    if not isinstance(identifier, exp.Identifier):
        _fail(clause, "expected a name", node)
    name = identifier.name if identifier.quoted else identifier.name.lower()
    if not 1 <= len(name) <= 64:
        _fail(clause, "names must be 1 to 64 characters", node)
    return name


def _dataset(select: exp.Select) -> str:
    source = select.args.get("from_") or select.args.get("from")
    if not isinstance(source, exp.From):
        _fail("FROM", "a FROM clause naming the dataset is required")
    table = source.this
    if isinstance(table, exp.Subquery) or table.find(exp.Select):
        _fail("FROM", "subqueries are not supported; name one dataset", table)
    if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
        _fail("FROM", "name one dataset (a table name)", table)
    for key, message in _TABLE_ARGS.items():
        if table.args.get(key):
            _fail("FROM", message, table)
    if any(value for key, value in table.args.items() if key != "this"):
        _fail("FROM", "only a plain dataset name is supported", table)
    return _name(table.this, "FROM", table)


def _column(node: exp.Expr, clause: str, dataset: str) -> str | None:
    """The column's name if ``node`` is a column reference, else ``None``."""
    node = _unwrap(node)
    if not isinstance(node, exp.Column) or isinstance(node.this, exp.Star):
        return None
    if node.args.get("db") or node.args.get("catalog"):
        _fail(clause, "qualify a column with the dataset name only", node)
    table = node.args.get("table")
    if table is not None and _name(table, clause, node) != dataset:
        _fail(clause, f"column qualifier does not name the dataset {dataset!r}", node)
    return _name(node.this, clause, node)


def _group_by(select: exp.Select, dataset: str) -> tuple[str, ...]:
    group = select.args.get("group")
    if not group:
        return ()
    if any(value for key, value in group.args.items() if key != "expressions"):
        _fail("GROUP BY", "only a list of columns is supported", group)
    names: list[str] = []
    for item in group.expressions:
        name = _column(item, "GROUP BY", dataset)
        if name is None:
            _fail("GROUP BY", "group by column names, not positions or expressions", item)
        if name in names:
            _fail("GROUP BY", f"column {name} is listed twice", item)
        names.append(name)
    return tuple(names)


def _select_list(select: exp.Select, group_by: tuple[str, ...],
                 dataset: str) -> list[Aggregate]:
    aggregates: list[Aggregate] = []
    selected: set[str] = set()
    for item in select.expressions:
        node, alias = item, None
        if isinstance(item, exp.Alias):
            node, alias = _unwrap(item.this), _name(item.args.get("alias"), "SELECT", item)
        if isinstance(node, exp.Star) or (isinstance(node, exp.Column)
                                          and isinstance(node.this, exp.Star)):
            _fail("SELECT", "SELECT * is not supported; list GROUP BY columns and aggregates",
                  item)
        name = _column(node, "SELECT", dataset)
        if name is None:
            aggregates.append(_aggregate(_unwrap(node), alias, item, dataset))
            continue
        if name not in group_by:
            _fail("SELECT", f"column {name} must appear in GROUP BY or inside an aggregate",
                  item)
        if alias is not None and alias != name:
            _fail("SELECT", "GROUP BY columns cannot be renamed", item)
        if name in selected:
            _fail("SELECT", f"column {name} is selected twice", item)
        selected.add(name)
    if not aggregates:
        _fail("SELECT", f"select at least one aggregate: {_AGGREGATES}")
    return aggregates


def _function_name(node: exp.Expr) -> str:
    if isinstance(node, exp.Anonymous):
        return node.name.upper()
    return node.sql_name() if isinstance(node, exp.Func) else node.key.upper()


def _aggregate(node: exp.Expr, alias: str | None, item: exp.Expr,
               dataset: str) -> Aggregate:
    for types, message in _NOT_AGGREGATES:
        if isinstance(node, types):
            _fail("SELECT", message, item)
    if isinstance(node, exp.AggFunc) and isinstance(node.this, exp.Distinct):
        _fail("SELECT", f"{_function_name(node)}(DISTINCT ...) is not supported", item)
    column: str | None = None
    q: float | None = None
    if isinstance(node, exp.Count):
        if not isinstance(node.this, exp.Star) or node.expressions:
            _fail("SELECT", "COUNT(column) is not supported; use COUNT(*) (the engine "
                  "imputes nulls, so every row counts)", item)
        kind = "count"
    elif type(node) in _SIMPLE:
        kind, function = _SIMPLE[type(node)]
        column = _argument(node.this, function, item, dataset)
    elif isinstance(node, exp.WithinGroup):
        inner, order = node.this, node.expression
        if not isinstance(inner, exp.PercentileCont):
            _fail("SELECT", f"function {_function_name(inner)} is not supported; use "
                  f"{_AGGREGATES}", item)
        ordered = order.expressions if isinstance(order, exp.Order) else []
        if inner.expression or len(ordered) != 1 or ordered[0].args.get("desc"):
            _fail("SELECT", "write PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY column)", item)
        kind, q = "quantile", _fraction(inner.this, item)
        column = _argument(ordered[0].this, "PERCENTILE_CONT", item, dataset)
    elif isinstance(node, exp.PercentileCont):
        _fail("SELECT", "write PERCENTILE_CONT(q) WITHIN GROUP (ORDER BY column)", item)
    elif isinstance(node, (exp.Quantile, exp.ApproxQuantile)):
        function = _function_name(node)
        extra = any(v for k, v in node.args.items() if k not in ("this", "quantile"))
        if extra or node.args.get("quantile") is None:
            _fail("SELECT", f"write {function}(column, q)", item)
        kind, q = "quantile", _fraction(node.args["quantile"], item)
        column = _argument(node.this, function, item, dataset)
    elif isinstance(node, exp.Func) and not isinstance(node, exp.Binary):
        _fail("SELECT", f"function {_function_name(node)} is not supported; use "
              f"{_AGGREGATES}", item)
    else:
        _fail("SELECT", f"only GROUP BY columns and aggregates ({_AGGREGATES}) may be "
              "selected, not expressions", item)
    return _build(Aggregate, "SELECT", item, kind=kind, column=column, q=q, alias=alias)


def _argument(node: exp.Expr | None, function: str, item: exp.Expr,
              dataset: str) -> str:
    name = None if node is None else _column(node, "SELECT", dataset)
    if name is None:
        _fail("SELECT", f"{function} takes one column, not an expression", item)
    return name


def _fraction(node: exp.Expr | None, item: exp.Expr) -> float:
    value = None if node is None else _literal(node, "SELECT")
    if isinstance(value, bool) or not isinstance(value, int | float):
        _fail("SELECT", "q must be a number between 0 and 1", item)
    return float(value)


def _literal(node: exp.Expr, clause: str) -> Scalar:
    shown, node = node, _unwrap(node)
    negative = isinstance(node, exp.Neg)
    node = _unwrap(node.this) if negative else node
    if type(node) is exp.Literal and node.is_string and not negative:
        return str(node.this)
    if type(node) is exp.Literal:
        text = str(node.this)
        try:
            number = int(text) if text.isascii() and text.isdigit() else float(text)
        except ValueError:
            _fail(clause, "not a number", shown)
        number = -number if negative else number
        if not (-_INT64 <= number < _INT64 if isinstance(number, int) else isfinite(number)):
            _fail(clause, "number out of range", shown)
        return number
    if isinstance(node, exp.Boolean) and not negative:
        return bool(node.this)
    if isinstance(node, exp.Null):
        _fail(clause, "NULL is not a supported value (every filter drops null rows)", shown)
    if isinstance(node, (exp.Subquery, exp.Select)):
        _fail(clause, "subqueries are not supported", shown)
    _fail(clause, "values must be literals: strings, numbers, TRUE or FALSE", shown)


def _where(select: exp.Select, dataset: str) -> list[Filter]:
    where = select.args.get("where")
    if where is None:
        return []
    filters: list[Filter] = []
    stack = [where.this]
    while stack:  # iterative, left to right: long AND chains must not exhaust the stack
        node = _unwrap(stack.pop())
        if isinstance(node, exp.And):
            stack.extend([node.expression, node.this])
        else:
            filters.extend(_condition(node, dataset))
    return filters


def _condition(node: exp.Expr, dataset: str) -> list[Filter]:
    if isinstance(node, exp.Not):
        inner = _unwrap(node.this)
        if isinstance(inner, exp.In):
            return [_in(inner, "not_in", node, dataset)]
        if isinstance(inner, (exp.Is, exp.Like, exp.ILike, exp.Or)):
            _refuse(inner, node)
        _fail("WHERE", f"NOT is only supported as NOT IN; {_FORM}", node)
    if isinstance(node, exp.In):
        return [_in(node, "in", node, dataset)]
    if isinstance(node, exp.Between):
        column = _column(node.this, "WHERE", dataset)
        if column is None or node.args.get("symmetric"):
            _fail("WHERE", "write column BETWEEN low AND high", node)
        low, high = _literal(node.args["low"], "WHERE"), _literal(node.args["high"], "WHERE")
        return [_build(Filter, "WHERE", node, column=column, op=">=", value=low),
                _build(Filter, "WHERE", node, column=column, op="<=", value=high)]
    if type(node) in _COMPARISONS:
        op = _COMPARISONS[type(node)]
        left = _column(node.this, "WHERE", dataset)
        right = _column(node.expression, "WHERE", dataset)
        if left is not None and right is not None:
            _fail("WHERE", "comparing two columns is not supported; compare a column with "
                  "a literal", node)
        if left is not None:
            column, value = left, _literal(node.expression, "WHERE")
        elif right is not None:
            column, op, value = right, _FLIPPED[op], _literal(node.this, "WHERE")
        else:
            _refuse(next((side for side in (_unwrap(node.this), _unwrap(node.expression))
                          if isinstance(side, exp.Func)), node), node)
        return [_build(Filter, "WHERE", node, column=column, op=op, value=value)]
    _refuse(node, node)


def _in(node: exp.In, op: str, shown: exp.Expr, dataset: str) -> Filter:
    if any(v for k, v in node.args.items() if k not in ("this", "expressions")):
        _fail("WHERE", "IN takes a list of literals, not a subquery", shown)
    column = _column(node.this, "WHERE", dataset)
    if column is None:
        _fail("WHERE", "IN needs a column on its left", shown)
    if not node.expressions:
        _fail("WHERE", "IN needs at least one value", shown)
    values = [_literal(value, "WHERE") for value in node.expressions]
    return _build(Filter, "WHERE", shown, column=column, op=op, value=values)


def _refuse(node: exp.Expr, shown: exp.Expr) -> NoReturn:
    for types, message in _NOT_CONDITIONS:
        if isinstance(node, types):
            _fail("WHERE", message, shown)
    if isinstance(node, exp.Func) and not isinstance(node, exp.Binary):
        _fail("WHERE", f"function {_function_name(node)} is not supported; {_FORM}", shown)
    _fail("WHERE", f"unsupported condition; {_FORM}", shown)
