"""segicl.vlsm.prompts: the P0-P9 generator of seed 000 and the deterministic prompt sampler."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segicl.vlsm.prompts import (
    LEVELS,
    PromptSampler,
    describe_mask,
    generate_prompts,
    location_word,
    pluralize,
    shape_word,
    size_word,
)


def disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_two_blobs_give_two_and_both_locations():
    mask = disc(90, 90, 15, 15, 8) | disc(90, 90, 75, 75, 8)
    attrs = describe_mask(mask)
    assert attrs.count == 2 and attrs.number == "two"
    assert set(attrs.locations) == {"top left", "bottom right"}
    p = generate_prompts(mask, "polyp")
    assert p["p5"] == ["two small round polyps"]
    assert p["p6"][0].startswith("two ") and "top left" in p["p6"][0] and "bottom right" in p["p6"][0]


def test_centred_blob_gives_center():
    mask = disc(96, 96, 48, 48, 20)
    p = generate_prompts(mask, "fetal head")
    assert p["p6"] == ["one medium round fetal head, located in center of the image"]
    assert all(t.endswith("located in center of the image") for t in p["p9"])


def test_levels_build_on_each_other():
    img = np.zeros((64, 64, 3), np.uint8)
    img[..., 0] = 220  # red
    mask = disc(64, 64, 10, 50, 6)
    p = generate_prompts(mask, "foot ulcer", Image.fromarray(img))
    assert list(p) == list(LEVELS)
    assert p["p0"] == [""] and p["p1"] == ["foot ulcer"]
    assert p["p2"] == ["round foot ulcer"]
    assert p["p3"] == ["red round foot ulcer"]
    assert p["p4"] == ["small red round foot ulcer"]
    assert p["p5"] == ["one small red round foot ulcer"]
    assert p["p6"] == ["one small red round foot ulcer, located in top right of the image"]
    assert p["p7"][0].startswith("foot ulcer which is ")
    assert len(p["p7"]) == len(p["p8"]) == len(p["p9"]) >= 2


def test_size_thresholds_and_tiny():
    assert size_word(0.005) == "tiny"
    assert size_word(0.05) == "small"
    assert size_word(0.2) == "medium"
    assert size_word(0.5) == "large"


def test_locations_are_image_thirds():
    assert location_word(0.1, 0.1) == "top left"
    assert location_word(0.5, 0.9) == "right"
    assert location_word(0.99, 0.5) == "bottom"


def test_shapes():
    assert shape_word(disc(80, 80, 40, 40, 20)) == "round"
    ellipse = np.zeros((80, 80), bool)
    yy, xx = np.mgrid[:80, :80]
    ellipse[((yy - 40) / 12) ** 2 + ((xx - 40) / 24) ** 2 <= 1] = True
    assert shape_word(ellipse) == "oval"
    assert shape_word(disc(80, 80, 40, 40, 25) & ~disc(80, 80, 40, 40, 15)) == "ring-shaped"
    bar = np.zeros((80, 80), bool)
    bar[38:42, 5:75] = True
    assert shape_word(bar) == "elongated"


def test_grayscale_colour_is_relative_brightness():
    img = np.full((50, 50), 40, np.uint8)
    mask = disc(50, 50, 25, 25, 10)
    img[mask] = 200
    assert describe_mask(mask, Image.fromarray(img)).colour == "bright"
    assert describe_mask(mask, Image.fromarray(255 - img)).colour == "dark"


def test_empty_mask():
    p = generate_prompts(np.zeros((20, 20), bool), "left ventricle cavity")
    assert p["p4"] == ["left ventricle cavity"]
    assert p["p5"] == p["p6"] == ["no left ventricle cavity"]
    assert "located" not in p["p9"][0]


def test_specks_are_not_counted():
    mask = disc(100, 100, 50, 50, 20)
    mask[2, 2] = True  # one-pixel annotation speck
    assert describe_mask(mask).number == "one"


def test_plurals():
    assert pluralize("nucleus") == "nuclei"
    assert pluralize("left ventricle cavity") == "left ventricle cavities"
    assert pluralize("breast tumour") == "breast tumours"


def test_bad_inputs():
    with pytest.raises(ValueError):
        describe_mask(np.zeros((3,), bool))
    with pytest.raises(ValueError):
        generate_prompts(np.ones((4, 4), bool), " ")
    with pytest.raises(ValueError):
        PromptSampler(["p10"])


def test_sampler_is_deterministic_and_uses_prompts_json(shared_data):
    from segicl.data import load_dataset

    ds = load_dataset(shared_data / "kvasir_seg")
    stem = ds.stems("train")[0]
    sample = ds.sample(stem, 255)
    sampler = PromptSampler(["p7", "p8", "p9"], seed=1)
    first = [sampler(sample, ds, epoch=e) for e in range(6)]
    assert first == [PromptSampler(["p7", "p8", "p9"], seed=1)(sample, ds, epoch=e) for e in range(6)]
    json_prompts = ds.prompts(stem)
    assert all(any(t in json_prompts[lv] for lv in ("p7", "p8", "p9")) for t in first)
    assert len(set(first)) > 1  # epochs draw different alternatives
    # Without prompts.json the generator's own attributes are used.
    generated = PromptSampler("p5", use_prompts_json=False)(sample, ds)
    assert generated.startswith(describe_mask(sample.mask).number + " ")


def test_generator_on_multiclass_data(shared_data):
    from segicl.data import load_dataset

    ds = load_dataset(shared_data / "acdc_cardiac_mri")
    stem = next(s for s in ds.stems("train") if 2 in ds.labels_present(s))
    sample = ds.sample(stem, 2)
    p = generate_prompts(sample.mask, sample.label, sample.image, sample.modality)
    assert "left ventricle myocardium" in p["p6"][0]
    assert "ring-shaped" in p["p2"][0] or "oval" in p["p2"][0] or "irregular" in p["p2"][0]
