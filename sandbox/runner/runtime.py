"""The sandbox runtime: the SDK and the allowed libraries, readable by the sandbox's uid.

Built once (``ensure_runtime``) by copying the installed distributions named in
``ALLOWED_DISTRIBUTIONS`` and the SDK (``sandbox/__init__.py`` + ``sandbox/sdk``) out of
the trusted environment into a world-readable directory; the sandbox sees it read-only.
The server side of the product (settings, database, keys, engine) is never copied.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata as md
import os
import shutil
import subprocess
from pathlib import Path

import sandbox

SANDBOX_PYTHON = "/usr/bin/python3"

ALLOWED_DISTRIBUTIONS = (
    "numpy", "polars", "polars-runtime-32", "pyarrow", "matplotlib", "contourpy", "cycler",
    "fonttools", "kiwisolver", "packaging", "pillow", "pyparsing", "python-dateutil", "six",
)


def _files(dist_name: str) -> list[Path]:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return []
    return [Path(str(dist.locate_file(f))) for f in (dist.files or [])
            if not str(f).startswith("..") and "__pycache__" not in str(f)]


@functools.cache
def runtime_key() -> str:
    digest = hashlib.sha256()
    for name in ALLOWED_DISTRIBUTIONS:
        try:
            digest.update(f"{name}=={md.version(name)}".encode())
        except md.PackageNotFoundError:
            continue
    sdk = Path(sandbox.__file__).parent / "sdk"
    for path in sorted(sdk.glob("*.py")):
        digest.update(path.read_bytes())
    digest.update(b"bytecode-v1")
    return digest.hexdigest()[:16]


def ensure_runtime(root: Path) -> Path:
    """The site-packages directory of the runtime under ``root`` (built if missing)."""
    target = root / f"runtime-{runtime_key()}"
    site = target / "site-packages"
    if (target / ".complete").exists():  # older runtimes were pruned by its builder
        return site
    staging = root / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "site-packages" / "sandbox" / "sdk").mkdir(parents=True)
    base = Path(str(md.distribution("numpy").locate_file("")))
    for name in ALLOWED_DISTRIBUTIONS:
        for source in _files(name):
            if not source.is_file():
                continue
            try:
                relative = source.relative_to(base)
            except ValueError:
                continue
            destination = staging / "site-packages" / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    package = Path(sandbox.__file__).parent
    (staging / "site-packages" / "sandbox" / "__init__.py").write_text(
        '"""The sandbox SDK runtime (server parts are not present here)."""\n')
    for path in (package / "sdk").glob("*.py"):
        shutil.copy2(path, staging / "site-packages" / "sandbox" / "sdk" / path.name)
    # bytecode, compiled by the interpreter the sandbox runs: the runtime is read-only
    # there, so without it every job would recompile numpy/polars/pyarrow (~1 s)
    subprocess.run([SANDBOX_PYTHON, "-m", "compileall", "-q", "-j", "0",
                    str(staging / "site-packages")], check=False, capture_output=True)
    for directory, _dirs, files in os.walk(staging):
        os.chmod(directory, 0o755)
        for name in files:
            os.chmod(os.path.join(directory, name), 0o644)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    (staging / ".complete").write_text("ok\n")
    try:
        staging.rename(target)
    except OSError:  # another worker finished first
        shutil.rmtree(staging, ignore_errors=True)
    _prune(root, keep=target)
    return site


def _prune(root: Path, keep: Path) -> None:
    """Keep the current runtime and the newest older one (jobs may still use it)."""
    older = sorted((p for p in root.glob("runtime-*") if p != keep),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in older[1:]:
        shutil.rmtree(stale, ignore_errors=True)
