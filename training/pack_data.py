"""Write a compact copy of dataset folders for a machine that cannot read ``../shared/data``.

Each image and label map of the chosen splits is resized to the training cache's stored size
(``training.cache.stored_size``: 72 px for the 64 px presets) exactly as :mod:`training.cache` does
(images bicubic in RGB, label maps nearest) and saved as PNG (lossless; grayscale datasets as
8-bit gray). A training cache built from the copy is therefore identical to one built from the
originals (checked on the train split of the five non-endoscopy datasets), while the copy is small
enough to travel (26 MB for those five datasets, train + val). ``dataset.json`` keeps the labels,
prompts and groups, lists only the packed splits and says ``image_ext: .png``. Test splits are not
packed by default: evaluate where the originals are.

    python -m training.pack_data --data ../shared/data --exclude kvasir_seg,cvc_clinicdb --out /tmp/packed
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from training.cache import _load_pair, stems_for, stored_size
from training.vlsm_task import resolve_datasets


def pack(data: Sequence[str | Path], out: str | Path, size: int = 64, margin: float = 0.125,
         splits: Sequence[str] = ("train", "val"), exclude: Sequence[str] = ()) -> list[Path]:
    """Pack every dataset under ``data`` (folders or roots) into ``out/<name>``; returns the folders."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; pack into a new folder")
    stored = stored_size(size, margin)
    written = []
    for ds in resolve_datasets(data, exclude):
        meta_path = Path(ds.root) / "dataset.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: pack_data needs the documented layout (dataset.json)")
        meta = json.loads(meta_path.read_text())
        dst = out / ds.name
        (dst / "images").mkdir(parents=True)
        (dst / "masks").mkdir()
        kept = {s: stems_for(ds, s) for s in splits if stems_for(ds, s)}
        meta["splits"] = kept
        meta["image_ext"] = ".png"
        meta["packed"] = f"training.pack_data: {stored} px (cache size for {size} px, margin {margin}), splits {sorted(kept)}"
        gray = meta.get("image_mode") == "L"
        for stems in kept.values():
            for stem in stems:
                img, lm = _load_pair(ds, stem, stored)
                if gray and np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2]):
                    Image.fromarray(img[..., 0], "L").save(dst / "images" / f"{stem}.png", optimize=True)
                else:
                    Image.fromarray(img, "RGB").save(dst / "images" / f"{stem}.png", optimize=True)
                Image.fromarray(lm, "L").save(dst / "masks" / f"{stem}.png", optimize=True)
        if (Path(ds.root) / "prompts.json").is_file():
            shutil.copy(Path(ds.root) / "prompts.json", dst / "prompts.json")
        (dst / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
        written.append(dst)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.pack_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", required=True, help="dataset folders or roots holding them")
    ap.add_argument("--out", required=True, help="new folder for the packed copy")
    ap.add_argument("--exclude", default="", help="datasets to leave out, comma-separated")
    ap.add_argument("--size", type=int, default=64, help="model resolution (the cache stores size * (1 + margin))")
    ap.add_argument("--splits", default="train,val")
    args = ap.parse_args(argv)
    written = pack(args.data, args.out, args.size, splits=[s for s in args.splits.split(",") if s],
                   exclude=[s for s in args.exclude.split(",") if s])
    for d in written:
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
