"""The job state machine as an inline SVG, drawn from ``TRANSITIONS`` (as the docs'
Mermaid diagram is), with one job's state marked.

No script and no style attributes (the pages' CSP allows neither): shapes carry classes
styled by the stylesheet, plus presentation attributes as a fallback. Every text is a
state name from the enum, escaped all the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

from sandbox.jobs.states import TERMINAL, TRANSITIONS, JobStatus

BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 128, 30, 22, 52, 12


@dataclass(frozen=True)
class Move:
    """A move the table allows out of a state."""

    target: str
    actors: str
    event: str


def moves_from(status: str) -> list[Move]:
    """The arrows leaving ``status``: where a job can go next, who moves it, the event."""
    return [Move(t.value, ", ".join(sorted(rule.actors)), rule.event)
            for (s, t), rule in TRANSITIONS.items() if s.value == status]


def _layers() -> list[list[JobStatus]]:
    """Non-terminal states by distance from ``queued``; every terminal state last."""
    depth = {JobStatus.QUEUED: 0}
    frontier = [JobStatus.QUEUED]
    while frontier:
        nxt = []
        for state in frontier:
            for (source, target) in TRANSITIONS:
                if source == state and target not in depth and target not in TERMINAL:
                    depth[target] = depth[state] + 1
                    nxt.append(target)
        frontier = nxt
    rows: list[list[JobStatus]] = [[] for _ in range(max(depth.values()) + 1)]
    for state in JobStatus:
        if state in depth:
            rows[depth[state]].append(state)
    rows.append([s for s in JobStatus if s in TERMINAL])
    return rows


def state_svg(current: str) -> Markup:
    """The diagram with ``current`` highlighted and the states it can move to marked."""
    rows = _layers()
    width = max(len(r) for r in rows) * (BOX_W + GAP_X) - GAP_X + 2 * MARGIN
    height = len(rows) * (BOX_H + GAP_Y) - GAP_Y + 2 * MARGIN
    centre: dict[JobStatus, tuple[float, float]] = {}
    for i, row in enumerate(rows):
        row_w = len(row) * (BOX_W + GAP_X) - GAP_X
        for j, state in enumerate(row):
            x = (width - row_w) / 2 + j * (BOX_W + GAP_X) + BOX_W / 2
            centre[state] = (x, MARGIN + i * (BOX_H + GAP_Y) + BOX_H / 2)
    following = {m.target for m in moves_from(current)}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="states" role="img" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" width="{width:.0f}" '
             f'height="{height:.0f}" aria-labelledby="states-title">',
             f'<title id="states-title">Job state machine; this job is '
             f'{escape(current)}</title>',
             '<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" '
             'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
             '<path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>']
    for (source, target), rule in TRANSITIONS.items():
        parts.append(_edge(centre[source], centre[target], source.value == current,
                           f"{rule.event} ({', '.join(sorted(rule.actors))})"))
    for state, (x, y) in centre.items():
        kind = "current" if state.value == current else \
            "next" if state.value in following else "other"
        fill = {"current": "#1f5fa8", "next": "#e6f0fa", "other": "#f4f4f4"}[kind]
        ink = "#fff" if kind == "current" else "#222"
        parts.append(f'<g class="state state-{kind}"><rect x="{x - BOX_W / 2:.1f}" '
                     f'y="{y - BOX_H / 2:.1f}" width="{BOX_W}" height="{BOX_H}" rx="6" '
                     f'fill="{fill}" stroke="#555"/><text x="{x:.1f}" y="{y + 4:.1f}" '
                     f'text-anchor="middle" fill="{ink}" font-size="13">'
                     f'{escape(state.value)}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


def _edge(a: tuple[float, float], b: tuple[float, float], live: bool, label: str) -> str:
    """A curved arrow from box ``a`` to box ``b``, clipped to the boxes' borders."""
    (x1, y1), (x2, y2) = a, b
    dx, dy = x2 - x1, y2 - y1
    length = math.hypot(dx, dy) or 1.0
    nx, ny = -dy / length, dx / length  # normal: opposite arrows bend to opposite sides
    bend = 18.0
    cx, cy = (x1 + x2) / 2 + nx * bend, (y1 + y2) / 2 + ny * bend
    sx, sy = _border(x1, y1, cx, cy)
    ex, ey = _border(x2, y2, cx, cy)
    colour = "#1f5fa8" if live else "#888"
    return (f'<path class="edge{" edge-live" if live else ""}" d="M {sx:.1f} {sy:.1f} '
            f'Q {cx:.1f} {cy:.1f} {ex:.1f} {ey:.1f}" fill="none" stroke="{colour}" '
            f'stroke-width="{2 if live else 1.2}" marker-end="url(#arrow)">'
            f'<title>{escape(label)}</title></path>')


def _border(x: float, y: float, tx: float, ty: float) -> tuple[float, float]:
    """Where the line from a box's centre ``(x, y)`` towards ``(tx, ty)`` leaves it."""
    dx, dy = tx - x, ty - y
    if dx == 0 and dy == 0:
        return x, y
    scale = min((BOX_W / 2) / abs(dx) if dx else math.inf,
                (BOX_H / 2) / abs(dy) if dy else math.inf)
    return x + dx * scale, y + dy * scale
