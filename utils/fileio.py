"""Crash-safe file writes shared by training, generation, post-processing, evaluation and the pipeline."""
from __future__ import annotations

import os
import pathlib
import tempfile

from utils.errors import UserError


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new content, never a torn file: a temporary
    file beside it, fsynced, renamed over it, and the directory fsynced."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass a file path to write to")
    if not path.parent.is_dir():
        raise UserError(f"{path}: directory {path.parent} does not exist; create it or pass another path")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
