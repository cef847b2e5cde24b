"""Helpers shared by the test modules (import as `from support import ...`: pytest puts tests/ on sys.path)."""
import hashlib
import os
from pathlib import Path


def tree_state(root: Path) -> dict[str, str]:
    """Every entry under root, by relative path: a file's sha256 and mode, a folder's mode, a link's target.
    Equal before and after an action means it deleted, changed and half-wrote nothing there."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                state[key] = f"link -> {os.readlink(path)}"
            elif path.is_dir():
                state[key] = f"dir {path.stat().st_mode:o}"
            else:
                state[key] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {path.stat().st_mode:o}"
    return state
