"""The benchmarks run end to end on small data (a smoke test, not a timing test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_benchmarks_smoke() -> None:
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_all.py"),
                             "--smoke"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio" in result.stdout
