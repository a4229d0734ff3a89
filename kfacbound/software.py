"""The software a result was produced with: package versions and, from a git checkout, the commit.

Recorded in every certificate (``software``) and every batch record (``versions``), so that a
result can be traced to the code that made it (e.g. a certificate computed before or after a fix
to prior training).
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

_VERSIONS: dict[str, str] | None = None


def git_commit() -> str | None:
    """The commit of the git checkout this package is imported from (suffixed "+dirty" when
    tracked files differ from it), or None when it is not a checkout or git is missing."""
    root = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no", "--", "."], capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
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
