"""Export the accepted masks of an annotation session as a dataset.

``segicl``: the project's dataset layout (``../shared/data/README.md``; read back by
:func:`segicl.data.load_dataset`): ``images/`` (8-bit files byte for byte; a volume's slices and 16-bit,
float or palette images as the 8-bit PNGs the page showed; slices grouped by volume), ``masks/<stem>.png``
(0 / 255), ``dataset.json`` with one label (255) and every accepted image in the ``train`` split.
``nnunet``: that layout converted by :func:`segicl.data.nnunet.to_nnunet` (the converter of
``segicl data convert``), i.e. a 2D nnU-Net v2 raw dataset (imagesTr/, labelsTr/, dataset.json).
Both are written atomically (a temporary folder renamed into place); an existing non-empty
destination is refused, never replaced.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

from PIL import Image

from segicl.annotate.state import Session, SessionError

FORMATS = ("segicl", "nnunet")


def write_segicl_layout(session: Session, dest: Path, label: str, modality: str = "unknown") -> Path:
    """The accepted images and masks as a dataset folder of the project's layout (written atomically)."""
    from segicl.io import atomic_directory
    from segicl.volumes import volume_stem

    names = [n for n in session.accepted if n in session.paths]
    if not names:
        raise SessionError(f"{session.out_dir}: no accepted masks to export")
    modes, suffixes = set(), set()
    with atomic_directory(dest) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for name in names:
            item = session.items[name]
            with Image.open(item.path) if item.index is None else nullcontext() as im:
                as_is = im is not None and im.mode in ("L", "RGB")
            if as_is:  # an 8-bit 2D file: copied byte for byte
                modes.add(im.mode)
                suffixes.add(item.path.suffix)
                shutil.copyfile(item.path, tmp / "images" / item.path.name)
            else:  # a volume's slice, or a 16-bit / float / palette image: the 8-bit image the page showed
                img = session.load_image(name)
                if img is None:
                    raise SessionError(f"{item.path}: unreadable volume; cannot export {name}")
                modes.add(img.mode)
                suffixes.add(".png")
                img.save(tmp / "images" / f"{item.stem}.png", format="PNG")
            shutil.copyfile(session.mask_path(name), tmp / "masks" / f"{item.stem}.png")
        meta = {"name": dest.name, "modality": modality,
                "description": f"Annotated with segicl annotate from {session.images_dir}"
                               + (f" ({session.text})" if session.text else ""),
                "image_mode": "L" if modes == {"L"} else "RGB",
                "labels": {"255": label}, "splits": {"train": [session.items[n].stem for n in names]},
                "groups": {session.items[n].stem: volume_stem(session.items[n].path) for n in names
                           if session.items[n].index is not None},
                "source": {"segicl_annotate": str(session.images_dir)}}
        if len(suffixes) == 1:
            meta["image_ext"] = suffixes.pop()
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return dest


def export_session(session: Session, dest: str | Path, fmt: str = "segicl", label: str | None = None,
                   modality: str = "unknown") -> Path:
    """Write the session's accepted set to ``dest`` as ``fmt`` (``segicl`` or ``nnunet``). Returns ``dest``.

    Raises:
        FileExistsError: ``dest`` exists and is not an empty folder.
        SessionError: nothing accepted yet.
    """
    dest = Path(dest).resolve()
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest}: exists and is not empty; export to a new folder")
    label = label or session.text or "foreground"
    dest.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "segicl":
        return write_segicl_layout(session, dest, label, modality)
    from segicl.data.nnunet import to_nnunet

    with tempfile.TemporaryDirectory(prefix=".segicl-export-", dir=dest.parent) as tmp:
        layout = write_segicl_layout(session, Path(tmp) / dest.name, label, modality)
        return to_nnunet(layout, dest)
