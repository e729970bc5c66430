"""Which code produced a result: the repository's HEAD and whether it had uncommitted changes."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_state(paths: tuple[str, ...] = ()) -> tuple[str | None, bool | None]:
    """(HEAD's full commit, whether tracked files under `paths` (all when empty) differ from it);
    (None, None) outside a git checkout or without git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, encoding="utf-8",
                              errors="replace", timeout=20, check=True).stdout.strip()
    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", *(("--", *paths) if paths else ()))
        return head, bool(dirty)
    except (OSError, subprocess.SubprocessError):
        return None, None
