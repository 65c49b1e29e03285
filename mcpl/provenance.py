"""Which code made a result: the git revision recorded in checkpoints, job.json and MLflow runs."""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


@lru_cache(maxsize=4)
def git_revision(repo: str | None = None) -> str:
    """`<sha>` or `<sha>-dirty` of the code that ran; `unknown` outside a git checkout.

    Cached per process: one job or batch records one revision, and asking git costs ~20 ms.
    """
    cwd = repo or str(REPO_ROOT)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
