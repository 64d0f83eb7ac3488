"""Build the demo sample that ships in the repo (segicl/assets/demo/).

Only the permissively licensed datasets ship (BUS-BRA: MIT-style with citation; HC18: CC BY 4.0;
FUSeg: public with the clinic's permission, CC0 elsewhere). Each keeps the documented layout
(dataset.json, images/, masks/) with a ``train`` split (the support pool) and a ``test`` split (the
demo queries), one image per patient/case group, non-empty masks only, chosen deterministically.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from segicl.data import load_dataset

DEMO_DATASETS = ("busbra_breast_us", "hc18_fetal_head_us", "fuseg_foot_ulcer")
ATTRIBUTION = {
    "busbra_breast_us": 'W. Gomez-Flores, M. J. Gregorio-Calas, W. C. A. Pereira, "BUS-BRA: A Breast Ultrasound '
    'Dataset for Assessing Computer-aided Diagnosis Systems", Medical Physics, 2023. MIT-style permission, citation required.',
    "hc18_fetal_head_us": 'T. L. A. van den Heuvel et al., "Automated measurement of fetal head circumference using 2D '
    'ultrasound images", PLoS ONE 13(8):e0200412, 2018. CC BY 4.0 (Zenodo 1327317).',
    "fuseg_foot_ulcer": 'C. Wang et al., "Fully Automatic Wound Segmentation with Deep Convolutional Neural Networks", '
    "Scientific Reports 10:21897, 2020. FUSeg 2021, shared publicly with the AZH Wound and Vascular Center's permission.",
}


def _pick(ds, split: str, n: int) -> list[str]:
    """First ``n`` stems of a split (sorted) with a non-empty mask, one per group."""
    chosen, groups = [], set()
    for stem in sorted(ds.stems(split)):
        if ds.group(stem) in groups or not ds.labels_present(stem):
            continue
        chosen.append(stem)
        groups.add(ds.group(stem))
        if len(chosen) == n:
            break
    return chosen


def build_demo_sample(data_root: Path, out: Path, n_support: int = 16, n_query: int = 4) -> list[Path]:
    """Copy a small sample of the permissive datasets into ``out``; returns the dataset folders."""
    folders = []
    for name in DEMO_DATASETS:
        ds = load_dataset(Path(data_root) / name)
        splits = {"train": _pick(ds, "train", n_support), "test": _pick(ds, "test", n_query)}
        dst = Path(out) / name
        if dst.exists():
            shutil.rmtree(dst)
        (dst / "images").mkdir(parents=True)
        (dst / "masks").mkdir()
        for stem in splits["train"] + splits["test"]:
            shutil.copyfile(ds.image_path(stem), dst / "images" / ds.image_path(stem).name)
            shutil.copyfile(ds.mask_path(stem), dst / "masks" / ds.mask_path(stem).name)
        meta = json.loads((ds.root / "dataset.json").read_text())
        meta["splits"] = splits
        meta["groups"] = {s: ds.group(s) for s in splits["train"] + splits["test"]}
        meta["selection"] = (
            f"SegICL demo sample: first {n_support} train and {n_query} test stems (sorted) with a non-empty mask, "
            f"one per group, from the full dataset. {meta.get('selection', '')}"
        )
        meta["attribution"] = ATTRIBUTION[name]
        (dst / "dataset.json").write_text(json.dumps(meta, indent=1))
        folders.append(dst)
    return folders


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "segicl" / "assets" / "demo")
    args = parser.parse_args()
    for f in build_demo_sample(args.data, args.out):
        print(f)
