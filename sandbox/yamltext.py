"""A cheap pre-check for YAML documents from users (policies, schemas): the pure-Python
parser spends about 1.5 ms per nesting level, so a deeply nested document is refused by
a linear scan before it is parsed."""

from __future__ import annotations

MAX_DEPTH = 64


def too_deep(text: str, max_depth: int = MAX_DEPTH) -> bool:
    """Whether flow brackets or block indentation nest deeper than ``max_depth``."""
    depth = 0
    for char in text:
        if char in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif char in "]}":
            depth = max(0, depth - 1)
    for line in text.splitlines():
        stripped = line.lstrip(" -")
        if stripped and len(line) - len(stripped) > 2 * max_depth:
            return True
    return False
