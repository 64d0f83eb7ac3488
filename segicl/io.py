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


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (checkpoint manifests)."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def save_safetensors_dir(path: str | Path, fmt: str, config: dict, state: dict) -> Path:
    """A small model folder, written atomically: ``config.json`` (``{"format": fmt, **config}``),
    ``model.safetensors`` (``state``) and ``manifest.json`` (the SHA-256 of each file)."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text(json.dumps({"format": fmt, **config}, indent=2) + "\n")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"))
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / "manifest.json").write_text(json.dumps({"files": {f: sha256_file(tmp / f) for f in files}}, indent=2) + "\n")
    return path


def load_safetensors_dir(path: str | Path, fmt: str) -> tuple[dict, dict]:
    """(config without its format, JSON lists as tuples, state dict) of a :func:`save_safetensors_dir`
    folder; a missing manifest, a file whose checksum does not match or another format is a clear error."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: missing (not a saved {fmt} model, or an interrupted save)")
    for name, digest in json.loads(manifest.read_text())["files"].items():
        if not (path / name).is_file() or sha256_file(path / name) != digest:
            raise ValueError(f"{path / name}: missing or its checksum does not match manifest.json")
    cfg = json.loads((path / "config.json").read_text())
    if cfg.pop("format", None) != fmt:
        raise ValueError(f"{path / 'config.json'}: not a {fmt} config")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}, load_file(str(path / "model.safetensors"))
