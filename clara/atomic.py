"""Putting a finished file or folder in place: every write that readers must see whole (checkpoints, corpora,
memory shards, caches) fills a temporary sibling and ends with ``publish``. A rename alone is atomic against a
kill but not against a power loss: the new name can reach the disk before the data it names, leaving an empty or
partial file under the final name. ``publish`` flushes the data first and the rename after."""

from __future__ import annotations

import os
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # POSIX (as the project is): a file or a folder is flushed through any descriptor
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: str | Path, final: str | Path) -> Path:
    """Rename the finished ``tmp`` (a file, or a folder with everything under it) to ``final`` after flushing its
    contents to disk, then flush the folder that holds the new name.

    Raises:
        OSError: from a flush, or as ``os.replace`` does, e.g. when ``final`` is a non-empty folder (callers that
            race another process for the same name check whether the name now exists).
    """
    tmp, final = Path(tmp), Path(final)
    for p in sorted(tmp.rglob("*")) if tmp.is_dir() else ():
        if not p.is_symlink():  # what a link points at is not part of this write
            _fsync(p)
    _fsync(tmp)
    os.replace(tmp, final)
    _fsync(final.parent)
    return final
