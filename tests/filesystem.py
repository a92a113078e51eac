"""Test helpers for folder trees deeper than Python's recursion limit."""

from __future__ import annotations

import os


def remove_tree(folder: str | os.PathLike) -> None:
    """rm -r without recursion (``shutil.rmtree`` recurses once per level)."""
    pending = [(os.fsencode(folder), False)]
    while pending:
        path, emptied = pending.pop()
        if emptied:
            os.rmdir(path)
            continue
        pending.append((path, True))
        for entry in os.scandir(path):
            if entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, False))
            else:
                os.unlink(entry.path)
