"""Outputs as a reviewer must see them: tables, text, figures, logs, the queries a
script asked, the checks' findings, and a release's signature.

Everything here returns plain data for the templates, which escape it. Figures are the
one exception to "text only": a figure becomes an ``<img>`` with a ``data:image/png``
URI only after its bytes were decoded, found to be a PNG by signature and by Pillow, and
re-encoded as base64 here; anything else is shown as "not a verified PNG", never as
markup.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sandbox.db.models import Job, JobResult, Release
from sandbox.review.checks import MAX_OUTPUT_BYTES
from sandbox.review.service import content_digest
from sandbox.review.signing import ReleaseInvalid, Signer, verify
from sandbox.web.templating import number

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_FIGURE_PIXELS = 40_000_000
MAX_TABLE_ROWS = 2_000


@dataclass
class Table:
    name: str
    columns: list[str]
    rows: list[list[str]]
    total_rows: int

    @property
    def truncated(self) -> bool:
        return self.total_rows > len(self.rows)


@dataclass
class Output:
    name: str
    kind: str
    table: Table | None = None
    text: str | None = None
    figure_src: str | None = None
    figure_size: tuple[int, int] | None = None
    problem: str | None = None


@dataclass
class Rendered:
    """One job's content, ready for the templates."""

    kind: str  # "script" or "table"
    tables: list[Table] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    logs: list[dict[str, str]] = field(default_factory=list)
    answered: list[dict[str, Any]] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    budget: dict[str, Any] | None = None
    crash_output: str = ""


def cell(value: Any) -> str:
    """One cell as text: ``value (low to high)``, ``value (rank error ±r)``, an SDC cell
    with its status, a histogram's bins, or the plain value."""
    if isinstance(value, dict):
        if "bins" in value and "counts" in value:
            return "; ".join(f"[{number(lo)}, {number(hi)}): {cell(c)}"
                             for (lo, hi), c in zip(value["bins"], value["counts"],
                                                    strict=False))
        if "status" in value:
            if value.get("value") is None:
                return f"suppressed ({value['status']})"
            return number(value.get("value"))
        if "rank_error" in value:
            return f"{number(value.get('value'))} (rank error ±{number(value['rank_error'])})"
        if "low" in value:
            low, high = value.get("low"), value.get("high")
            if low is None or high is None:
                return f"{number(value.get('value'))} (no bounded interval)"
            return f"{number(value.get('value'))} ({number(low)} to {number(high)})"
        if set(value) == {"value"}:
            return number(value["value"])
        return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
    if isinstance(value, list):
        return json.dumps(value, ensure_ascii=False, default=str)
    return number(value)


def query_table(name: str, content: dict[str, Any]) -> Table:
    """A released query table (DP or SDC): ``columns`` and ``rows`` of dicts."""
    columns = [str(c.get("name")) for c in content.get("columns", []) if isinstance(c, dict)]
    rows = list(content.get("rows", []))
    return Table(name, columns, [[cell(r.get(c)) if isinstance(r, dict) else cell(r)
                                  for c in columns] for r in rows[:MAX_TABLE_ROWS]],
                 len(rows))


def script_table(name: str, payload: Any) -> Table:
    """An emitted table: ``{"columns": [...], "rows": [[...], ...]}``."""
    payload = payload if isinstance(payload, dict) else {}
    columns = [str(c) for c in payload.get("columns", [])]
    rows = [r if isinstance(r, list) else [r] for r in payload.get("rows", [])]
    return Table(name, columns, [[cell(v) for v in r] for r in rows[:MAX_TABLE_ROWS]],
                 len(rows))


def figure(payload: Any) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """``(data URI, size, None)`` for a verified PNG; ``(None, None, why)`` otherwise."""
    from PIL import Image

    if not isinstance(payload, str) or len(payload) > MAX_OUTPUT_BYTES * 4 // 3 + 4:
        return None, None, "not a verified PNG (not base64 text of an allowed size)"
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        return None, None, "not a verified PNG (not base64)"
    if not raw.startswith(PNG_SIGNATURE):
        return None, None, "not a verified PNG (no PNG signature)"
    try:
        with Image.open(io.BytesIO(raw)) as image:
            if image.format != "PNG" or image.width * image.height > MAX_FIGURE_PIXELS:
                return None, None, "not a verified PNG (format or size)"
            size = image.size
            image.verify()
    except Exception:
        return None, None, "not a verified PNG (Pillow could not read it)"
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii"), size, None


def render(content: dict[str, Any] | None) -> Rendered | None:
    """The reviewer's view of a job's content (``None`` when there is none yet)."""
    if content is None:
        return None
    facts = []
    for key in ("mode", "exit", "queries", "epsilon", "rho", "mechanism", "keys",
                "confidence", "threshold"):
        if content.get(key) is not None:
            facts.append((key, cell(content[key])))
    if isinstance(content.get("cost"), dict):
        cost = content["cost"]
        facts.append(("cost", f"{number(cost.get('amount'))} {cost.get('unit', '')}"
                      + (f", delta {number(cost['delta'])}" if cost.get("delta") else "")))
    if isinstance(content.get("rules"), dict):
        facts.append(("SDC rules", json.dumps(content["rules"], sort_keys=True)))
    rendered = Rendered(kind="script" if content.get("kind") == "script" else "table",
                        facts=facts, budget=content.get("budget")
                        if isinstance(content.get("budget"), dict) else None,
                        checks=[c for c in content.get("checks", []) if isinstance(c, dict)],
                        findings=[str(f) for f in content.get("findings", [])])
    if rendered.kind == "table":
        rendered.tables.append(query_table("result", content))
        return rendered
    for out in content.get("outputs", []):
        if not isinstance(out, dict):
            continue
        item = Output(name=str(out.get("name", "")), kind=str(out.get("kind", "")))
        payload = out.get("payload")
        if item.kind == "table":
            item.table = script_table(item.name, payload)
        elif item.kind == "text":
            item.text = payload if isinstance(payload, str) else json.dumps(payload)
        elif item.kind == "figure":
            item.figure_src, item.figure_size, item.problem = figure(payload)
        else:
            item.problem = "output of an unknown kind: shown as text"
            item.text = json.dumps(payload, ensure_ascii=False, default=str)
        rendered.outputs.append(item)
    rendered.logs = [{"stream": str(log.get("stream", "")), "text": str(log.get("text", ""))}
                     for log in content.get("logs", []) if isinstance(log, dict)]
    for answer in content.get("answered", []) or []:
        if isinstance(answer, dict):
            raw = answer.get("release")
            release: dict[str, Any] = raw if isinstance(raw, dict) else {}
            rendered.answered.append({
                "seq": answer.get("seq"), "query": answer.get("query"),
                "cost": release.get("cost"),
                "table": query_table(f"query {answer.get('seq')}", release)})
    rendered.crash_output = str(content.get("crash_output") or "")
    return rendered


@dataclass(frozen=True)
class ReleaseInfo:
    """A release's signature and whether it verifies now."""

    release_id: str
    sha256: str
    key_id: str | None
    algorithm: str
    signature: str
    released_at: str
    released_by: str
    signature_ok: bool
    signature_message: str
    content_unchanged: bool


def release_info(session: Session, job: Job, signer: Signer,
                 released_by: Callable[[str], str]) -> ReleaseInfo | None:
    """The job's release, its signature checked against this server's public key and its
    stored content against the approved hash; ``None`` if not released. ``released_by``
    names the releasing reviewer (by user id) as the page may."""
    release = session.scalar(select(Release).where(Release.job_id == job.id))
    if release is None:
        return None
    artifact = release.artifact or {}
    try:
        payload = verify(artifact, signer.public_pem())
        ok, message = True, "valid: signed by this server's key, content matches the hash"
    except ReleaseInvalid as exc:
        payload, ok, message = {}, False, f"INVALID: {exc}"
    except Exception:
        payload, ok, message = {}, False, "INVALID: the artifact could not be read"
    result = session.get(JobResult, job.id)
    unchanged = result is not None and content_digest(result.content) == release.content_sha256
    return ReleaseInfo(release_id=release.id, sha256=release.content_sha256,
                       key_id=release.key_id, algorithm=str(artifact.get("algorithm", "")),
                       signature=str(artifact.get("signature", "")),
                       released_at=str(payload.get("released_at") or release.created_at),
                       released_by=released_by(release.released_by) if release.released_by
                       else "automatic release (no review required)", signature_ok=ok,
                       signature_message=message, content_unchanged=unchanged)
