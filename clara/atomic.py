"""Putting a finished file or folder in place: every write that readers must see whole (checkpoints, corpora,
memory shards, caches) fills a temporary sibling and ends with ``publish``; a folder that may replace an earlier one
(a checkpoint) is written through ``written_atomically``. A rename alone is atomic against a kill but not against a
power loss: the new name can reach the disk before the data it names, leaving an empty or partial file under the
final name. ``publish`` flushes the data first and the rename after."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


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


def check_replaceable(path: str | Path, complete: str, kind: str = "checkpoint") -> None:
    """Refuse to write a folder of ``kind`` at ``path`` over anything but nothing, an empty folder or a folder of
    the same kind (one holding the entry ``complete``): an ``--out`` that names a parent folder, a run folder or a
    file would otherwise be replaced, and everything in it lost. Commands call it before any work.

    Raises:
        ValueError: naming the path and what is there.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file; a {kind} is a folder: give a new path")
    if path.is_dir() and not (path / complete).exists() and any(path.iterdir()):
        raise ValueError(f"{path} is a folder that is not a {kind} (no {complete} in it); writing the {kind} there "
                         f"would replace it and everything in it: give a new path, or a {kind}'s own folder")


@contextmanager
def written_atomically(path: Path, complete: str, kind: str = "checkpoint") -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; on success it replaces ``path`` (an earlier folder there is
    moved aside first, so readers see the old or the new one, never a half-written one); on failure it is removed.

    A writer killed outright (SIGKILL, power loss) cannot clean up: the next write of ``path`` puts back the
    earlier folder if the kill fell between the two renames (only a whole one: it holds the entry ``complete``,
    which a folder of this kind is written with), and removes the temporary folders left beside it; leftovers
    of a path that is never written again are the caller's to sweep. One writer per path at a time (a checkpoint
    has one owner). What is at ``path`` must be replaceable (``check_replaceable``).
    """
    check_replaceable(path, complete, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if (old / complete).exists() and not path.exists():  # moved aside by a writer killed between its renames
        os.replace(old, path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.tmp"):  # mkdtemp's 8 random characters
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            publish(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
