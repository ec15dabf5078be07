"""The query builder and ``emit`` (see the package docstring)."""

from __future__ import annotations

import builtins
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sandbox.sdk import channel


@dataclass(frozen=True)
class Agg:
    kind: str
    column: str | None = None
    q: float | None = None
    bins: tuple[float, ...] | None = None
    alias: str | None = None

    def alias_as(self, name: str) -> Agg:
        return replace(self, alias=name)

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for key in ("column", "q", "alias"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.bins is not None:
            out["bins"] = list(self.bins)
        return out


def count() -> Agg:
    return Agg("count")


def sum(column: str) -> Agg:
    return Agg("sum", column)


def mean(column: str) -> Agg:
    return Agg("mean", column)


def median(column: str) -> Agg:
    return Agg("median", column)


def quantile(column: str, q: float) -> Agg:
    return Agg("quantile", column, q=q)


def histogram(column: str, bins: Sequence[float]) -> Agg:
    return Agg("histogram", column, bins=tuple(float(b) for b in bins))


@dataclass(frozen=True)
class Query:
    """An immutable query under construction; each call returns a new one."""

    dataset: str
    filters: tuple[dict[str, Any], ...] = ()
    keys: tuple[str, ...] = ()
    aggregates: tuple[Agg, ...] = ()
    dp_keys: bool = False

    def filter(self, column: str, op: str, value: Any) -> Query:
        return replace(self, filters=(*self.filters, {"column": column, "op": op,
                                                      "value": value}))

    def group_by(self, *columns: str, dp_keys: bool = False) -> Query:
        return replace(self, keys=tuple(columns), dp_keys=dp_keys)

    def agg(self, *aggregates: Agg) -> Query:
        return replace(self, aggregates=(*self.aggregates, *aggregates))

    def spec(self, *, epsilon: float | None = None, rho: float | None = None,
             delta: float | None = None) -> dict[str, Any]:
        spec: dict[str, Any] = {"dataset": self.dataset, "filters": list(self.filters),
                                "group_by": list(self.keys),
                                "aggregates": [a.spec() for a in self.aggregates],
                                "keys": "dp" if self.dp_keys else "public"}
        for name, value in (("epsilon", epsilon), ("rho", rho), ("delta", delta)):
            if value is not None:
                spec[name] = value
        return spec

    def release(self, *, epsilon: float | None = None, rho: float | None = None,
                delta: float | None = None) -> Released:
        """Ask the broker; its budget is charged before it computes. Raises
        ``BrokerError`` with the broker's public reason if it refuses."""
        return Released(channel.query(self.spec(epsilon=epsilon, rho=rho, delta=delta)))


class _Datasets:
    def __getitem__(self, name: str) -> Query:
        return Query(dataset=name)


datasets = _Datasets()


@dataclass
class Released:
    """A released table: every value noisy, with its interval. Post-processing it keeps
    the guarantee; it never holds a row."""

    raw: dict[str, Any]
    columns: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.columns = [c["name"] for c in self.raw.get("columns", [])]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return list(self.raw.get("rows", []))

    def values(self) -> list[dict[str, Any]]:
        """Rows with plain values (the ``value`` of each released cell)."""
        return [{k: (v.get("value") if isinstance(v, dict) and "value" in v else v)
                 for k, v in row.items()} for row in self.rows]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.values())

    def __len__(self) -> int:
        return len(self.rows)


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def emit(name: str, output: Any) -> None:
    """Send a named output for review: a ``Released`` table, a list of dicts, a string,
    or a matplotlib figure. Nothing else leaves the sandbox."""
    if isinstance(output, Released):
        channel.emit(name, "table", {"columns": output.columns,
                                     "rows": [[_plain(r.get(c)) for c in output.columns]
                                              for r in output.values()]})
    elif isinstance(output, builtins.str):
        channel.emit(name, "text", output)
    elif isinstance(output, list) and all(isinstance(r, dict) for r in output):
        columns = list(dict.fromkeys(k for r in output for k in r))
        channel.emit(name, "table", {"columns": columns,
                                     "rows": [[_plain(r.get(c)) for c in columns]
                                              for r in output]})
    elif hasattr(output, "savefig"):
        import base64
        import io
        buffer = io.BytesIO()
        output.savefig(buffer, format="png")
        channel.emit(name, "figure", base64.b64encode(buffer.getvalue()).decode())
    else:
        raise TypeError("emit takes a released table, a list of dicts, a string or a figure")
