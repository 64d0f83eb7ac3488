"""segicl.matching (training-free label propagation), the pipeline's matching route and the labelprop
eval method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segicl.config import MatchingConfig, SegICLConfig, load_preset
from segicl.matching import match_supports, patch_features, propagate_labels
from segicl.pipeline import SegICLPipeline
from training.common import batch_dice


def _scene(seed: int, shift: int = 0, size: int = 64, side: int = 10):
    """A textured dark background with one bright red square (the 'lesion', ~2.5 % of the pixels)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, size, size, generator=g) * 0.6 - 0.9  # dark noise in [-0.9, -0.3]
    mask = torch.zeros(1, size, size)
    y0, x0 = 20 + shift, 24 + shift
    img[:, y0 : y0 + side, x0 : x0 + side] = torch.tensor([0.9, -0.2, -0.2]).view(3, 1, 1)
    mask[:, y0 : y0 + side, x0 : x0 + side] = 1
    return img, mask


def test_patch_features_are_unit_vectors_and_position_adds_two_dims():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    f = patch_features(x, 16)
    fp = patch_features(x, 16, position=1.0)
    assert f.shape == (2, 256, 15) and fp.shape == (2, 256, 17)
    assert torch.allclose(f.norm(dim=-1), torch.ones(2, 256), atol=1e-5)
    # brightness / contrast changes cancel (features are standardised per image)
    assert torch.allclose(patch_features(0.5 * x + 0.1, 16), f, atol=1e-4)


@pytest.mark.parametrize("balanced", [False, True])
def test_propagation_finds_the_structure_in_a_new_image(balanced):
    cfg = MatchingConfig(grid=32, scale=100.0, position=0.0, top_k=20, balanced=balanced)
    sup = [_scene(s) for s in (1, 2, 3)]
    simg = torch.stack([s[0] for s in sup])[None]
    smask = torch.stack([s[1] for s in sup])[None]
    qimg, qmask = _scene(7, shift=9)  # another noise draw, the square elsewhere (appearance, not position)
    prior = match_supports(qimg[None], simg, smask, [3], cfg, 64)
    assert prior.shape == (1, 1, 64, 64) and 0 <= prior.min() and prior.max() <= 1
    assert batch_dice(prior[:, 0], qmask)[0] > 0.7  # edge patches are half foreground
    # a query without the structure gets (almost) nothing
    empty = match_supports(torch.rand(1, 3, 64, 64) * 0.6 - 0.9, simg, smask, [3], cfg, 64)
    assert (empty > 0.5).float().mean() < 0.01


def test_balanced_votes_recover_a_small_structure_that_plain_averaging_misses():
    # a mostly-background match: each query patch also resembles many background patches, so the plain
    # average of support labels stays under 0.5; dividing by the class fractions does not
    q = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.0]]]), dim=-1)  # (1, 1, 2): one query patch
    keys = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [1.0, -0.05], [1.0, 0.1]]), dim=-1)
    s_keys = keys.view(1, 4, 2)  # one support with 4 patches (g = 2), one of them foreground
    smask = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 1, 2, 2)
    q4 = q.expand(1, 4, 2)
    plain = propagate_labels(q4, s_keys, smask, [1], scale=1.0)
    balanced = propagate_labels(q4, s_keys, smask, [1], scale=1.0, balanced=True)
    assert plain.max() < 0.5 < balanced.max()


def test_items_without_supports_get_zeros():
    cfg = MatchingConfig()
    img, mask = _scene(1)
    simg = torch.stack([img, img])[:, None]
    smask = torch.stack([mask, mask])[:, None]
    prior = match_supports(torch.stack([img, img]), simg, smask, [1, 0], cfg, 64)
    assert prior[1].abs().sum() == 0 and prior[0].sum() > 0


def test_matching_config_is_validated_and_old_configs_load_without_it():
    with pytest.raises(ValueError, match="matching.mode"):
        load_preset("tiny", matching={"mode": "nearest"})
    with pytest.raises(ValueError, match="matching.grid"):
        load_preset("tiny", matching={"mode": "route", "grid": 64})
    d = load_preset("tiny").to_dict()
    d.pop("matching")
    assert SegICLConfig.from_dict(d).matching.mode == "none"


def test_route_renders_the_matched_mask_only_for_items_with_supports():
    pipe = SegICLPipeline.from_preset("tiny", matching={"mode": "route"})
    img, mask = _scene(1)
    q, _ = _scene(2, shift=5)
    images = torch.stack([q, q])
    s = pipe.encode(images, ["a", "a"], [[(img, mask)], []])
    prior = pipe.match(images[:1], img[None, None], mask[None, None], [1])
    assert torch.allclose(s[0], pipe.condition_encoder((prior > 0.5).float())[0], atol=1e-5)
    assert torch.allclose(s[0], pipe.route_condition(prior)[0])
    assert torch.allclose(s[1], pipe.encoder(["a"], images[1:])[0], atol=1e-5)  # k = 0: the LM's S
    pipe.config.matching.mode = "none"
    assert not torch.allclose(pipe.encode(images, ["a", "a"], [[(img, mask)], []])[0], s[0], atol=1e-3)


def test_labelprop_method_segments_from_its_supports():
    from PIL import Image

    from eval.methods import build_method, parse_spec
    from segicl.data import Sample

    def sample(seed, shift=0):
        img, mask = _scene(seed, shift)
        arr = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
        return Sample(image=Image.fromarray(arr), mask=mask[0].numpy() > 0, dataset="toy", label="square",
                      label_value=1, modality="toy", stem=f"s{seed}", group=f"s{seed}", split="train",
                      image_path=None, mask_path=None)

    assert parse_spec("labelprop") == ("labelprop", None)
    with pytest.raises(ValueError, match="takes no argument"):
        parse_spec("labelprop:x")
    method, prov = build_method("labelprop", {"labelprop": {"position": 0.0}})
    assert method.uses_supports and method.min_k == 1 and "label propagation" in prov["labelprop"]
    q = sample(7, shift=9)
    prob, unc = method.predict(q, [sample(1), sample(2)], "", 0)
    assert prob.shape == q.mask.shape and unc is None
    inter = ((prob > 0.5) & q.mask).sum()
    assert 2 * inter / ((prob > 0.5).sum() + q.mask.sum()) > 0.7
    with pytest.raises(ValueError, match="labelprop"):
        build_method("labelprop", {"labelprop": {"radius": 3}})
