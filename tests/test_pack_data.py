"""training.pack_data: a packed copy gives the same training cache as the original folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segicl import PACKAGE_DIR
from segicl.data import find_datasets, load_dataset
from training.cache import build_cache
from training.pack_data import pack

DEMO = PACKAGE_DIR / "assets" / "demo"


def test_packed_copy_builds_the_same_cache(tmp_path):
    out = tmp_path / "packed"
    written = pack([DEMO], out, size=64, splits=("train",), exclude=["fuseg_foot_ulcer"])
    assert sorted(d.name for d in written) == ["busbra_breast_us", "hc18_fetal_head_us"]
    orig = [load_dataset(f) for f in find_datasets(DEMO, exclude=["fuseg_foot_ulcer"])]
    packed = [load_dataset(d) for d in written]
    a = build_cache(orig, "train", 64, None, progress=False)
    b = build_cache(packed, "train", 64, None, progress=False)
    assert a.stems == b.stems and a.datasets == b.datasets
    assert np.array_equal(a.images, b.images) and np.array_equal(a.label_maps, b.label_maps)
    meta = json.loads((out / "hc18_fetal_head_us" / "dataset.json").read_text())
    assert list(meta["splits"]) == ["train"] and meta["image_ext"] == ".png"
    assert not (out / "hc18_fetal_head_us" / "images" / f"{meta_test_stem()}.png").exists()
    with pytest.raises(FileExistsError, match="not empty"):
        pack([DEMO], out)


def meta_test_stem() -> str:
    return json.loads((DEMO / "hc18_fetal_head_us" / "dataset.json").read_text())["splits"]["test"][0]
