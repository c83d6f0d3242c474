"""The release's version, kept here and nowhere else, and the commit it was built from.

pyproject.toml reads `VERSION` (setuptools' `attr:`); /healthz, `stox --version`, the start-up
log line and the OpenAPI document read `version()` and `commit()`. A built binary carries its
commit in the module `stox._build`, which its build registers (packaging/build.py); a
checkout asks git.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

VERSION = "0.1.0"


def version() -> str:
    return VERSION


@functools.cache
def commit() -> str:
    """The short commit id ("unknown" outside a checkout and a build that did not say)."""
    try:
        from stox import _build  # type: ignore[attr-defined]  # in a binary: packaging/build.py

        return str(_build.COMMIT)
    except ImportError:
        pass
    try:
        found = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip() or "unknown"


def describe() -> str:
    """What `--version` prints: `stox 0.1.0 (commit 1a2b3c4d5e6f)`."""
    return f"stox {version()} (commit {commit()})"
