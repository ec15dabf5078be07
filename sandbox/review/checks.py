"""Output checks: small plug-ins in an explicit registry, run on every output.

Each check looks at a job's content (and may normalise it) and returns findings for the
reviewer: ``info``, ``warn`` or ``block``. A ``block`` finding sends the job to human
review even when the policy would release it automatically. The content is normalised
(floats rounded, figures re-encoded, formula cells made inert) *before* it is hashed, so
the reviewer approves, and the release signs, exactly what the analyst will receive.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from sandbox.datasets.schema import DatasetSchema

SIGNIFICANT_DIGITS = 6
MAX_OUTPUT_BYTES = 2 * 1024 * 1024
MAX_TEXT_CHARS = 200_000
ROW_FRACTION = 0.05
_ID_NAME = re.compile(r"(^|_)(id|uuid|identifier|ssn|phone|email)$", re.IGNORECASE)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class Finding:
    check: str
    severity: str  # info, warn, block
    message: str
    output: str | None = None


@dataclass
class Context:
    content: dict[str, Any]
    schema: DatasetSchema


Check = Callable[[Context], list[Finding]]
REGISTRY: dict[str, Check] = {}


def check(name: str) -> Callable[[Check], Check]:
    def register(fn: Check) -> Check:
        REGISTRY[name] = fn
        return fn
    return register


def tables(content: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """Every table in the content as (name, columns, rows of cells)."""
    found = []
    if content.get("kind") == "script":
        for out in content.get("outputs", []):
            if out["kind"] == "table":
                payload = out["payload"]
                found.append((out["name"], list(payload.get("columns", [])),
                              list(payload.get("rows", []))))
    elif "rows" in content:
        columns = [c["name"] for c in content.get("columns", [])]
        rows = [[row.get(c) for c in columns] for row in content["rows"]]
        found.append(("result", columns, rows))
    return found


def _round(value: Any) -> Any:
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


@check("float_precision")
def float_precision(ctx: Context) -> list[Finding]:
    ctx.content.update(_round(ctx.content))
    return [Finding("float_precision", "info",
                    f"numbers rounded to {SIGNIFICANT_DIGITS} significant digits")]


@check("output_types")
def output_types(ctx: Context) -> list[Finding]:
    findings = []
    for out in ctx.content.get("outputs", []):
        if out.get("kind") not in ("table", "text", "figure"):
            findings.append(Finding("output_types", "block",
                                    f"output of unknown kind {out.get('kind')!r}", out["name"]))
    return findings


@check("size_caps")
def size_caps(ctx: Context) -> list[Finding]:
    findings = []
    for out in ctx.content.get("outputs", []):
        size = len(json.dumps(out.get("payload")))
        if size > MAX_OUTPUT_BYTES:
            findings.append(Finding("size_caps", "block", f"output is {size} bytes, over "
                                    f"{MAX_OUTPUT_BYTES}", out["name"]))
        if out.get("kind") == "text" and len(str(out.get("payload"))) > MAX_TEXT_CHARS:
            findings.append(Finding("size_caps", "block", "text output is too long",
                                    out["name"]))
    return findings


@check("figures")
def figures(ctx: Context) -> list[Finding]:
    """Re-encode every figure as a plain PNG: metadata chunks (and anything hidden in
    them) are dropped."""
    from PIL import Image

    findings = []
    for out in ctx.content.get("outputs", []):
        if out.get("kind") != "figure":
            continue
        try:
            raw = base64.b64decode(str(out["payload"]), validate=True)
            with Image.open(io.BytesIO(raw)) as image:
                image.load()
                clean = Image.new(image.mode, image.size)
                clean.putdata(list(image.getdata()))
            buffer = io.BytesIO()
            clean.save(buffer, format="PNG")
            out["payload"] = base64.b64encode(buffer.getvalue()).decode()
            findings.append(Finding("figures", "info", "figure re-encoded without metadata",
                                    out["name"]))
        except Exception:
            findings.append(Finding("figures", "block", "figure is not a readable PNG",
                                    out["name"]))
    return findings


@check("formula_cells")
def formula_cells(ctx: Context) -> list[Finding]:
    """Spreadsheet formulas (``=HYPERLINK(...)``) become inert text (a leading quote)."""
    changed = 0
    for _name, _columns, rows in tables(ctx.content):
        for row in rows:
            for i, cell in enumerate(row):
                if isinstance(cell, str) and cell.startswith(_FORMULA):
                    row[i] = "'" + cell
                    changed += 1
    return [Finding("formula_cells", "warn", f"{changed} formula-like cells made inert")] \
        if changed else []


@check("identifier_columns")
def identifier_columns(ctx: Context) -> list[Finding]:
    findings = []
    for name, columns, rows in tables(ctx.content):
        for j, column in enumerate(columns):
            values = [r[j] for r in rows if j < len(r) and isinstance(r[j], str)]
            if _ID_NAME.search(str(column)):
                findings.append(Finding("identifier_columns", "block",
                                        f"column {column!r} looks like an identifier", name))
            elif len(values) >= 50 and len(set(values)) >= 0.9 * len(values):
                findings.append(Finding("identifier_columns", "block",
                                        f"column {column!r} has nearly all-distinct text "
                                        "values", name))
    return findings


@check("row_count")
def row_count(ctx: Context) -> list[Finding]:
    limit = max(1000, int(ctx.schema.max_rows * ROW_FRACTION))
    return [Finding("row_count", "block", f"{len(rows)} rows: looks like row-level data "
                    f"(limit {limit})", name)
            for name, _columns, rows in tables(ctx.content) if len(rows) > limit]


@check("sdc_findings")
def sdc_findings(ctx: Context) -> list[Finding]:
    return [Finding("sdc_findings", "warn", str(f)) for f in ctx.content.get("findings", [])]


def run_checks(content: dict[str, Any], schema: DatasetSchema) -> list[dict[str, Any]]:
    """Run every registered check in order (normalising ``content`` in place)."""
    findings: list[Finding] = []
    ctx = Context(content, schema)
    for fn in REGISTRY.values():
        findings.extend(fn(ctx))
    return [asdict(f) for f in findings]


def blocked(findings: list[dict[str, Any]]) -> bool:
    return any(f["severity"] == "block" for f in findings)
