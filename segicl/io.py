"""Atomic writes of checkpoint folders (pipeline, VLSM models, support stores) and of single files.

:func:`atomic_directory` yields a fresh temporary folder beside the target; the caller writes every
file into it; on success the folder is fsynced and swapped in with ``os.replace`` (an existing target
is first moved aside and removed only after the swap), so a reader never sees a half-written
checkpoint and an interrupted save leaves the previous one intact. On any error the temporary folder
is removed and the target is untouched. A save that was killed leaves only a hidden ``.<name>.*.tmp``
folder, which no reader opens and the next successful save of the same target removes.

    with atomic_directory("runs/model") as tmp:
        (tmp / "config.json").write_text(...)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries to disk (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_stale(path: Path, before: float) -> None:
    """Remove the temporary / old folders of ``path`` that earlier, killed saves left (older than ``before``)."""
    for p in path.parent.glob(f".{path.name}.*"):
        if p.suffix in (".tmp", ".old") and p.is_dir():
            try:
                if p.stat().st_mtime < before:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Write a folder atomically: yields a temporary folder, swapped in for ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_dir(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
        _remove_stale(path, started)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Write one file atomically: yields a temporary path beside ``path`` (same suffixes, so writers
    that pick the format from the name, such as ``nibabel.save``, behave alike); on success it is
    fsynced and moved onto ``path`` with ``os.replace``; on any error it is removed and ``path`` is
    untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_file`) and durably (the folder entry is fsynced too)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    fsync_dir(path.parent)
