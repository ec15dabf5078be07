"""The submission screen for analyst scripts: clear, early errors (defence in depth).

Before a script job is queued, RestrictedPython compiles it (its checks catch dunder
attribute access and similar tricks), and an AST pass refuses imports outside the
configured allow-list and calls of ``exec``, ``eval``, ``compile``, ``__import__``,
``open``, ``globals``, ``locals``, ``vars``, ``getattr``/``setattr``/``delattr``,
``breakpoint`` and ``input``. Every finding names its line. This is not the security
boundary (the OS sandbox is); it turns the obvious mistakes and probes into a 422 instead
of a wasted job.
"""

from __future__ import annotations

import ast

from sandbox.errors import Invalid

ALLOWED_IMPORTS = frozenset({
    "sandbox.sdk", "numpy", "polars", "pyarrow", "matplotlib", "math", "statistics", "json",
    "itertools", "collections", "datetime", "re", "functools", "random", "typing",
    "dataclasses", "decimal", "fractions", "operator", "string", "textwrap", "bisect",
    "heapq", "enum", "copy", "pprint", "time",
})
FORBIDDEN_CALLS = frozenset({"exec", "eval", "compile", "__import__", "open", "globals",
                             "locals", "vars", "getattr", "setattr", "delattr", "breakpoint",
                             "input", "memoryview"})
MAX_SCRIPT_BYTES = 256 * 1024


class ScriptRefused(Invalid):
    """The script failed the screen; the message lists each finding with its line."""


def _allowed(module: str, allowed: frozenset[str]) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def screen(source: str, *, allowed_imports: frozenset[str] = ALLOWED_IMPORTS) -> None:
    """Raise ``ScriptRefused`` listing every finding; return if the script may be queued."""
    if len(source.encode()) > MAX_SCRIPT_BYTES:
        raise ScriptRefused(f"script: larger than {MAX_SCRIPT_BYTES} bytes")
    try:
        tree = ast.parse(source, filename="script.py")
    except SyntaxError as exc:
        raise ScriptRefused(f"line {exc.lineno}: syntax error: {exc.msg}") from None
    except (RecursionError, MemoryError, ValueError):
        raise ScriptRefused("script: nested too deeply to compile") from None
    try:
        _walk(tree, source, allowed_imports)
    except RecursionError:
        raise ScriptRefused("script: nested too deeply to compile") from None


def _walk(tree: ast.AST, source: str, allowed_imports: frozenset[str]) -> None:
    findings: list[str] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not _allowed(alias.name, allowed_imports):
                    findings.append(f"line {line}: import of {alias.name!r} is not allowed")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level or not _allowed(module, allowed_imports):
                findings.append(f"line {line}: import from {module or '.'!r} is not allowed")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in FORBIDDEN_CALLS:
            findings.append(f"line {line}: {node.func.id}() is not allowed")
        elif isinstance(node, ast.Attribute) and node.attr.startswith("__") \
                and node.attr.endswith("__"):
            findings.append(f"line {line}: access to {node.attr!r} is not allowed")
        elif isinstance(node, ast.Name) and node.id.startswith("__") and node.id not in \
                ("__name__", "__doc__"):
            findings.append(f"line {line}: the name {node.id!r} is not allowed")
    findings += _restricted_python(source)
    if findings:
        unique = list(dict.fromkeys(findings))
        raise ScriptRefused("; ".join(unique[:20]))


def _restricted_python(source: str) -> list[str]:
    """RestrictedPython's own verdicts about dunder tricks (its underscore-name rule for
    ordinary variables is not applied: analysts may name things ``_x``)."""
    from RestrictedPython import compile_restricted_exec

    result = compile_restricted_exec(source, filename="script.py")
    findings = []
    for error in result.errors or ():
        if '"__' in error or "'__" in error or "exec" in error or "eval" in error:
            findings.append(error.replace("Line ", "line ", 1).rstrip("."))
    return findings
