"""Generated docs stay in step with the code."""

from __future__ import annotations

from pathlib import Path

from sandbox.jobs.diagram import page

REPO = Path(__file__).resolve().parent.parent


def test_state_diagram_is_current() -> None:
    current = (REPO / "docs" / "explanation" / "job-states.md").read_text()
    assert current == page(), "run: python -m sandbox.jobs.diagram > docs/explanation/job-states.md"
