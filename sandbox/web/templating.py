"""The Jinja2 environment of the web pages, its filters, and ``page`` (render one page).

Autoescaping is on for every template (not only ``.html``): every string a template
prints is escaped unless it was built as ``Markup`` here in Python from escaped parts
(the state diagram). Analyst-controlled strings (job names, output names, logs, table
cells, reasons) therefore reach the browser as text, never as markup.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from fastapi import Request
from jinja2 import Environment, PackageLoader, StrictUndefined
from starlette.responses import HTMLResponse

from sandbox.db.models import as_utc

ROLE_HOME = {"owner": "Data owner", "reviewer": "Reviewer", "admin": "Administrator",
             "analyst": "Analyst"}


def number(value: Any) -> str:
    """A number for people: 6 significant digits in fixed notation (the precision the
    output checks keep), thousands separators from 10,000, scientific only when tiny or
    huge."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if not isinstance(value, float):
        return str(value)
    if not math.isfinite(value) or value == 0:
        return str(value) if value else "0"
    size = abs(value)
    if size < 1e-4 or size >= 1e15:
        return f"{value:.6g}"
    decimals = max(0, 5 - math.floor(math.log10(size)))
    text = f"{round(value, decimals):{',' if size >= 10_000 else ''}.{decimals}f}"
    return text.rstrip("0").rstrip(".") if decimals else text


def when(value: datetime | str | None) -> str:
    """A UTC timestamp to the second, ``2026-01-02 03:04:05 UTC``."""
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            moment = as_utc(datetime.fromisoformat(value))
        except ValueError:
            return value
    else:
        moment = as_utc(value)
    assert moment is not None
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def compact_json(value: Any) -> str:
    """``pretty_json`` without the keys whose value is null (the defaults of a spec)."""
    def strip(item: Any) -> Any:
        if isinstance(item, dict):
            return {k: strip(v) for k, v in item.items() if v is not None}
        if isinstance(item, list):
            return [strip(v) for v in item]
        return item
    return pretty_json(strip(value))


def short(value: str | None, length: int = 12) -> str:
    return "" if value is None else str(value)[:length]


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("sandbox.web", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(number=number, when=when, pretty_json=pretty_json,
                       compact_json=compact_json, short=short)
    env.globals["ROLE_HOME"] = ROLE_HOME
    return env


ENV = _environment()


def page(request: Request, template: str, *, status_code: int = 200,
         **context: Any) -> HTMLResponse:
    """Render ``template`` with the signed-in user (if any), the CSRF token for its forms
    and ``context``."""
    state = request.state
    principal = getattr(state, "principal", None)
    keeper = request.app.state.web_sessions
    web_session = getattr(state, "web_session", None)
    base = {"request": request, "principal": principal,
            "csrf_token": keeper.csrf_token(web_session) if web_session else "",
            "flash": context.pop("flash", None), "error": context.pop("error", None)}
    html = ENV.get_template(template).render(**base, **context)
    return HTMLResponse(html, status_code=status_code)
