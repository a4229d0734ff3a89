"""The software a result was produced with: package versions and, from a git checkout, the commit.

Recorded in every certificate (``software``) and every batch record (``versions``), so that a
result can be traced to the code that made it (e.g. a certificate computed before or after a fix
to prior training).
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

_VERSIONS: dict[str, str] | None = None


def git_commit() -> str | None:
    """The commit of the git checkout this package is imported from (suffixed "+dirty" when
    tracked files differ from it), or None when the package does not sit at the top of a
    checkout (an installed copy, even inside another repository) or git is missing. Read-only:
    no optional index locks, so a commit running beside a batch is not disturbed."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env["GIT_OPTIONAL_LOCKS"] = "0"

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args],
                              capture_output=True, text=True, timeout=10, env=env)
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "kfacbound")
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    if dirty.returncode != 0:
        return head.stdout.strip() + "+unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    """Python, platform and the versions of kfacbound, torch, BackPACK, NumPy and SciPy, plus
    ``kfacbound_commit`` (:func:`git_commit`, "unknown" outside a checkout). Cached."""
    global _VERSIONS
    if _VERSIONS is None:
        out = {"python": platform.python_version(), "platform": platform.platform()}
        for dist in ("kfacbound", "torch", "backpack-for-pytorch", "numpy", "scipy"):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = "missing"
        out["kfacbound_commit"] = git_commit() or "unknown"
        _VERSIONS = out
    return dict(_VERSIONS)
