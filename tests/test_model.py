"""SegICL model: condition encoder, decoder, multimodal encoder, pipeline (tiny random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segicl.condition_encoder import ConditionEncoder
from segicl.config import SegICLConfig, load_preset
from segicl.pipeline import SegICLPipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe():
    return SegICLPipeline.from_preset("tiny", seed=0)


def _img(seed, h=70, w=90):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _mask(seed, h=70, w=90):
    m = np.zeros((h, w), bool)
    rng = np.random.default_rng(seed)
    y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
    m[y : y + h // 3, x : x + w // 3] = True
    return m


def test_presets_load_and_validate():
    cfg = load_preset("tiny")
    assert cfg.num_condition_tokens == (cfg.mask_size // cfg.condition.patch_size) ** 2
    assert SegICLConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model preset"):
        load_preset("nope")
    with pytest.raises(ValueError, match="unknown SegICL config keys"):
        SegICLConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    bad = cfg.to_dict()
    bad["condition"]["patch_size"] = 7
    with pytest.raises(ValueError, match="multiple"):
        SegICLConfig.from_dict(bad)


def test_condition_encoder_tokens_depend_on_mask_and_position():
    ce = ConditionEncoder(mask_size=32, patch_size=8, dim=16, hidden=32)
    m = torch.zeros(2, 1, 32, 32)
    m[0, :, :8, :8] = 1  # same patch content at two different places
    m[1, :, 8:16, 8:16] = 1
    c = ce(m)
    assert c.shape == (2, 16, 16)
    assert not torch.allclose(c[0], c[1])
    with pytest.raises(ValueError, match="expected masks of shape"):
        ce(torch.zeros(2, 32, 32))


def test_decoder_loss_trains_all_parts(pipe):
    cfg = pipe.config
    s = cfg.image_size
    img = torch.randn(2, 3, s, s)
    m = (torch.rand(2, 1, cfg.mask_size, cfg.mask_size) > 0.5).float()
    pipe.decoder.train()
    out = pipe.decoder.loss(img, m, pipe.condition_encoder(m), pipe.scheduler, cond_dropout=0.5, cond_noise=0.2,
                            generator=torch.Generator().manual_seed(0))
    out["loss"].backward()
    pipe.decoder.eval()
    for part in (pipe.decoder.unet, pipe.decoder.controlnet, pipe.condition_encoder):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
    for part in (pipe.decoder, pipe.condition_encoder):
        part.zero_grad(set_to_none=True)


def test_encoder_left_padding_makes_items_independent(pipe):
    """An item's S must not depend on its batch-mates (k and text lengths differ)."""
    cfg = pipe.config
    s, m = cfg.image_size, cfg.mask_size
    g = torch.Generator().manual_seed(1)
    q = torch.rand(2, 3, s, s, generator=g) * 2 - 1
    simg = torch.rand(2, 3, 3, s, s, generator=g) * 2 - 1
    smask = (torch.rand(2, 3, 1, m, m, generator=g) > 0.5).float()
    with torch.no_grad():
        cond = pipe.condition_encoder(smask.flatten(0, 1)).view(2, 3, cfg.num_condition_tokens, -1)
        both = pipe.encoder(["short", "a much longer instruction text"], q, simg, cond, [3, 1])
        a = pipe.encoder(["short"], q[:1], simg[:1], cond[:1], [3])
        b = pipe.encoder(["a much longer instruction text"], q[1:], simg[1:, :1], cond[1:, :1], [1])
        zero = pipe.encoder(["short"], q[:1])
    assert torch.allclose(both[0], a[0], atol=1e-4)
    assert torch.allclose(both[1], b[0], atol=1e-4)
    assert both.shape == (2, cfg.num_condition_tokens, cfg.condition.dim)
    assert not torch.allclose(a, zero, atol=1e-3)  # the supports reach S


def test_pipeline_segments_at_original_resolution_deterministically(pipe):
    imgs = [_img(0, 70, 90), _img(1, 50, 40)]
    sup = [[(_img(2), _mask(2)), (_img(3, 60, 60), _mask(3, 60, 60))], []]
    kw = dict(text=["Segment the lesion.", None], supports=sup, num_inference_steps=2, num_samples=2)
    out = pipe(imgs, generator=torch.Generator().manual_seed(0), **kw)
    assert [m.shape for m in out.masks] == [(70, 90), (50, 40)]
    assert all(p.dtype == np.float32 and p.min() >= 0 and p.max() <= 1 for p in out.probabilities)
    assert all(u.shape == p.shape and u.min() >= 0 for u, p in zip(out.uncertainty, out.probabilities))
    from segicl.postprocess import Decision, apply

    # the mask is the thresholded probability, post-processed as the supports decided (none without supports)
    assert np.array_equal(out.masks[0], apply(out.probabilities[0] > pipe.config.threshold, Decision(**out.postprocess[0])))
    assert np.array_equal(out.masks[1], out.probabilities[1] > pipe.config.threshold)
    again = pipe(imgs, generator=torch.Generator().manual_seed(0), **kw)
    other = pipe(imgs, generator=torch.Generator().manual_seed(1), **kw)
    assert np.array_equal(out.probabilities[0], again.probabilities[0])
    assert not np.array_equal(out.probabilities[0], other.probabilities[0])
    one = pipe(imgs, generator=torch.Generator().manual_seed(0), **{**kw, "num_samples": 1})
    assert np.all(one.uncertainty[0] == 0)


def test_pipeline_rejects_bad_input(pipe):
    with pytest.raises(ValueError, match="k_max"):
        pipe([_img(0)], supports=[[(_img(1), _mask(1))] * (pipe.config.k_max + 1)], num_inference_steps=1)
    with pytest.raises(ValueError, match="texts for"):
        pipe([_img(0)], text=["a", "b"], num_inference_steps=1)
    with pytest.raises(TypeError, match=r"images\[0\]"):
        pipe([42], num_inference_steps=1)
    with pytest.raises(ValueError, match="2-D"):
        pipe([_img(0)], supports=[[(_img(1), np.zeros((2, 3, 4, 5)))]], num_inference_steps=1)


def test_save_load_roundtrip_and_corruption(pipe, tmp_path):
    path = pipe.save_pretrained(tmp_path / "ck", extra={"note": "test"})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["note"] == "test" and "decoder.safetensors" in manifest["files"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    loaded = SegICLPipeline.from_pretrained(path)
    for name, module in pipe.modules().items():
        a, b = module.state_dict(), loaded.modules()[name].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.embedder_id == pipe.embedder_id
    img = [_img(5)]
    e1, e2 = pipe.embed_images(img), loaded.embed_images(img)
    assert e1.shape == (1, pipe.config.vision.embed_dim) and np.allclose(e1, e2, atol=1e-6)
    assert np.isclose(np.linalg.norm(e1), 1.0, atol=1e-5)
    # a second save over the same directory replaces it atomically
    pipe.save_pretrained(path)
    raw = bytearray((path / "decoder.safetensors").read_bytes())
    raw[-10] ^= 0xFF
    (path / "decoder.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        SegICLPipeline.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        SegICLPipeline.from_pretrained(tmp_path / "missing")


def test_latent_space_decoder_builds_and_trains():
    cfg = load_preset("tiny")
    d = cfg.to_dict()
    d["decoder"]["space"] = "latent"
    d["decoder"]["vae_block_out_channels"] = [16, 32]
    d["decoder"]["norm_num_groups"] = 16
    cfg = SegICLConfig.from_dict(d)
    pipe = SegICLPipeline.from_config(cfg)
    m = (torch.rand(2, 1, 64, 64) > 0.5).float()
    out = pipe.decoder.loss(torch.randn(2, 3, 64, 64), m, pipe.condition_encoder(m), pipe.scheduler)
    assert {"vae_rec", "vae_kl", "diffusion"} <= out.keys() and torch.isfinite(out["loss"])
    prob = pipe.decoder.sample(torch.randn(1, 3, 64, 64), pipe.condition_encoder(m[:1]), pipe.scheduler, 2, 1)
    assert prob.shape == (1, 1, 64, 64)


@pytest.mark.parametrize("layout", [("query", "interleaved"), ("learned", "fused"), ("query", "fused")])
def test_encoder_layout_options(layout):
    """slot_init='query' ties each slot to its query cell; support_tokens='fused' puts image + mask in one
    token per cell. Both keep batching independent and S dependent on the supports."""
    from training.stage2 import with_new_encoder

    base = SegICLPipeline.from_preset("tiny", seed=0)
    slot_init, support_tokens = layout
    pipe = with_new_encoder(base, {"lm": {"slot_init": slot_init, "support_tokens": support_tokens}}, seed=0)
    assert pipe.decoder is base.decoder and pipe.config.lm.slot_init == slot_init
    assert hasattr(pipe.encoder, "slot_proj") == (slot_init == "query")
    cfg = pipe.config
    s, m, n = cfg.image_size, cfg.mask_size, cfg.num_condition_tokens
    g = torch.Generator().manual_seed(3)
    q = torch.rand(2, 3, s, s, generator=g) * 2 - 1
    simg = torch.rand(2, 3, 3, s, s, generator=g) * 2 - 1
    smask = (torch.rand(2, 3, 1, m, m, generator=g) > 0.5).float()
    with torch.no_grad():
        cond = pipe.condition_encoder(smask.flatten(0, 1)).view(2, 3, n, -1)
        both = pipe.encoder(["a", "bb"], q, simg, cond, [3, 1])
        a = pipe.encoder(["a"], q[:1], simg[:1], cond[:1], [3])
        flipped = pipe.encoder(["a"], q[:1], simg[:1], cond[:1].flip(2), [3])  # other support masks
        other_q = pipe.encoder(["a"], q[1:], simg[:1], cond[:1], [3])
    assert both.shape == (2, n, cfg.condition.dim)
    assert torch.allclose(both[0], a[0], atol=1e-4)
    assert not torch.allclose(a, flipped, atol=1e-3)  # support masks reach S
    assert not torch.allclose(a, other_q, atol=1e-3)
    if slot_init == "query":  # the slots themselves see the query (one token per condition-grid cell)
        grid = pipe.encoder.vision_grid(q[:1])
        assert pipe.encoder._to_grid(grid, int(n**0.5)).shape == (1, n, grid.shape[1])
    with pytest.raises(ValueError, match="vision.*lm"):
        with_new_encoder(base, {"decoder": {"space": "latent"}})
    bad = cfg.to_dict()
    bad["lm"]["support_tokens"] = "stacked"
    with pytest.raises(ValueError, match="support_tokens"):
        SegICLConfig.from_dict(bad)


def test_support_prior_propagates_support_labels():
    """lm.support_prior='attention': each query patch averages the mask values of the support patches
    it matches; with the query equal to the support and a sharp temperature the prior is the support's
    pooled mask. The pipeline passes the raw support masks; S depends on them through the prior."""
    from training.stage2 import with_new_encoder

    base = SegICLPipeline.from_preset("tiny", seed=0)
    pipe = with_new_encoder(base, {"lm": {"slot_init": "query", "support_tokens": "fused", "support_prior": "attention"}}, seed=0)
    enc, cfg = pipe.encoder, pipe.config
    s, m = cfg.image_size, cfg.mask_size
    g = torch.Generator().manual_seed(5)
    img = torch.rand(1, 3, s, s, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 1, m, m)
    mask[..., : m // 2, : m // 4] = 1  # top-left block: pooled to the patch grid it is 0/1 per patch
    with torch.no_grad():
        enc.prior_logit_scale.fill_(8.0)  # temperature e^-8: the best-matching patch wins
        grid = enc.vision_grid(img)
        prior = enc.support_prior(grid, grid, mask, [1])
        gp = grid.shape[-1]
        expected = torch.nn.functional.adaptive_avg_pool2d(mask[0], gp).view(1, 1, gp, gp)
        assert torch.allclose(prior, expected, atol=0.05)
        # zero supports: no prior; the flag tells the slots
        assert enc.support_prior(grid, grid[:0], mask, [0]).abs().sum() == 0
        cond = pipe.condition_encoder(mask.flatten(0, 1)).view(1, 1, cfg.num_condition_tokens, -1)
        a = enc(["x"], img, img[:, None], cond, [1], support_masks=mask)
        b = enc(["x"], img, img[:, None], cond, [1], support_masks=1 - mask)  # only the raw masks differ
    assert not torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="support_masks"):
        enc(["x"], img, img[:, None], cond, [1])
    from segicl.data.transforms import tensor_to_image

    pil = tensor_to_image(img[0])
    out = pipe([pil], "x", supports=[[(pil, mask[0, 0].numpy())]], num_inference_steps=2)  # pipeline path
    assert out.masks[0].shape == (pil.height, pil.width)
    bad = cfg.to_dict()
    bad["lm"]["support_prior"] = "soft"
    with pytest.raises(ValueError, match="support_prior"):
        SegICLConfig.from_dict(bad)
