"""VLSM baselines: every model x mode builds at tiny size and trains on real data; gradients reach
exactly the parameters the mode tunes; frozen stays frozen; save/load; real-size parameter counts."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from segicl.losses import dice_bce_loss
from segicl.vlsm import ADAPTER_MODES, MODES, build_vlsm, load_vlsm
from segicl.vlsm.prompt_learners import LEARNERS, TEXT_LEARNERS
from tests.conftest import REPO

CONFIGS = REPO / "configs" / "vlsm"
VIT_MODELS = ("clipseg", "biomedclipseg", "biomedclipseg_d")
CASES = [(m, mode) for m in VIT_MODELS for mode in MODES] + [
    ("cris", mode) for mode in ("zero_shot", "e2e", "decoder", *TEXT_LEARNERS)
]


def tiny(model: str, mode: str, **overrides):
    cfg = {"seed": 0, **overrides}
    from segicl.vlsm.registry import load_config

    return build_vlsm(model, mode, {**load_config(CONFIGS / f"{model}_tiny.yaml"), **cfg})


@pytest.fixture(scope="module")
def batch(shared_data):
    """Two real pairs (Kvasir RGB polyp, BUS-BRA grayscale tumour) at 64 px with P1/P5 prompts."""
    from segicl.data import load_dataset
    from segicl.data.transforms import image_to_tensor, mask_to_tensor
    from segicl.vlsm.prompts import PromptSampler

    samples = []
    for name in ("kvasir_seg", "busbra_breast_us"):
        ds = load_dataset(shared_data / name)
        samples.append((ds, ds.sample(ds.stems("train")[3], 255)))
    sampler = PromptSampler(["p1", "p5"], seed=0)
    return {
        "pixel_values": torch.stack([image_to_tensor(s.image, 64) for _, s in samples]),
        "mask": torch.stack([mask_to_tensor(s.mask, 64) for _, s in samples]),
        "texts": [sampler(s, ds) for ds, s in samples],
        "images": [s.image for _, s in samples],
    }


def _tuned_prefixes(model, mode: str) -> tuple[str, ...]:
    if mode in LEARNERS:
        return ("net.learner.", "net.upsampler.")
    if mode in ADAPTER_MODES:
        return ("net.adapters.",)
    if mode == "decoder":
        return ("net.head.",) if model.model_name != "cris" else ("net.neck.", "net.decoder.", "net.proj.")
    return ()


@pytest.mark.parametrize("model_name, mode", CASES, ids=[f"{m}-{mo}" for m, mo in CASES])
def test_model_mode_trains_exactly_its_parameters(model_name, mode, batch):
    torch.manual_seed(0)
    model = tiny(model_name, mode)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    tok = model.tokenize(batch["texts"])
    x, y = batch["pixel_values"], batch["mask"]
    if mode == "zero_shot":
        assert not trainable
        with torch.no_grad():
            logits = model(x, **tok)
        assert logits.shape == (2, 1, 64, 64) and torch.isfinite(logits).all()
        return
    prefixes = _tuned_prefixes(model, mode)
    if mode == "e2e":
        assert trainable == {n for n, _ in model.named_parameters()}
    else:
        assert trainable and all(n.startswith(prefixes) for n in trainable)
        assert {n for n, _ in model.named_parameters() if n.startswith(prefixes)} == trainable
    # Everything outside the tuned modules (weights and BatchNorm statistics) must not move.
    frozen_before = {} if mode == "e2e" else {
        n: t.detach().clone() for n, t in model.state_dict().items() if not n.startswith(prefixes)
    }
    # Whole-model Adam at 5e-3 oscillates on CRIS (BatchNorm over a batch of 2); e2e takes a smaller step.
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3 if mode == "e2e" else 5e-3)
    model.train()
    losses = []
    for step in range(6):
        opt.zero_grad()
        loss = dice_bce_loss(model(x, **tok), y)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if n in trainable and mode != "e2e":
                    assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n} got no gradient"
                    assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"
                if n not in trainable:
                    assert p.grad is None, f"frozen {n} got a gradient"
            if mode == "e2e":  # decoder and both encoders receive gradient end to end
                grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
                for part in (("net.head.", "net.decoder."), ("text_model.", "text.transformer.", "transformer.resblocks"),
                             ("vision_model.", "visual.")):
                    assert any(any(k in n for k in part) and g.abs().sum() > 0 for n, g in grads.items()), part
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    after = model.state_dict()
    for n, t in frozen_before.items():  # weights and BatchNorm statistics of frozen parts
        assert torch.equal(after[n], t), f"frozen {n} changed"


def test_zero_shot_clipseg_equals_transformers_forward(tmp_path):
    """The re-composed forward is the library's CLIPSeg (checkpoint-dir code path)."""
    from transformers import CLIPSegForImageSegmentation

    from segicl.vlsm.clipseg import clipseg_config
    from segicl.vlsm.registry import load_config
    from segicl.vlsm.tokenizers import clip_tokenizer

    torch.manual_seed(1)
    arch = load_config(CONFIGS / "clipseg_tiny.yaml")["arch"]
    hf = CLIPSegForImageSegmentation(clipseg_config(arch)).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    clip_tokenizer().save_pretrained(tmp_path / "ckpt")
    model = build_vlsm("clipseg", "zero_shot", {"pretrained": str(tmp_path / "ckpt"), "image_size": 64}).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tok = model.tokenize(["a polyp", "one small round tumour"])
    with torch.no_grad():
        ours = model(x, **tok)[:, 0]
        px = (x + 1) / 2
        px = (px - torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)) / torch.tensor(
            [0.26862954, 0.26130258, 0.27577711]
        ).view(1, 3, 1, 1)
        ref = hf(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=px).logits
    assert torch.allclose(ours, ref, atol=1e-4)


def test_save_load_roundtrip_and_predict(tmp_path, batch):
    torch.manual_seed(0)
    for model_name, mode in (("clipseg", "maple"), ("cris", "cocoop"), ("biomedclipseg", "adapter_dense_vlc")):
        model = tiny(model_name, mode)
        with torch.no_grad():  # make the tuned parameters non-trivial
            for p in model.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.eval()
        out = tmp_path / f"{model_name}_{mode}"
        model.save_pretrained(out)
        model.save_pretrained(out)  # overwrite in place, atomically
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        loaded = load_vlsm(out)
        assert loaded.mode == mode and loaded.model_name == model_name
        tok = model.tokenize(batch["texts"])
        with torch.no_grad():
            assert torch.allclose(model(batch["pixel_values"], **tok), loaded(batch["pixel_values"], **tok), atol=1e-5)
        probs = loaded.predict(batch["images"], batch["texts"])
        for p, im in zip(probs, batch["images"]):
            assert p.shape == (im.height, im.width) and p.dtype == np.float32
            assert 0.0 <= p.min() and p.max() <= 1.0


def test_real_size_parameter_counts():
    """Adapter counts of seed 003 at the real CLIPSeg size, computed on the meta device (no weights)."""
    from segicl.vlsm.adapters import clipseg_adapter_parameter_count
    from segicl.vlsm.clipseg import CLIPSEG_RD64_REFINED

    assert clipseg_adapter_parameter_count("dense", "vlc") == 3_237_376  # paper: ~3M
    assert clipseg_adapter_parameter_count("shallow", "vlc") == 4_201_984  # paper: 4.2M
    cfg = {"arch": CLIPSEG_RD64_REFINED, "adapter": {"dense_bottleneck": 64, "shallow_bottleneck": 512,
                                                     "cond_bottleneck": 256}}
    with torch.device("meta"):
        da = build_vlsm("clipseg", "adapter_dense_vlc", cfg)
        sa = build_vlsm("clipseg", "adapter_shallow_vlc", cfg)
        cris = build_vlsm("cris", "e2e", {})
    assert da.num_parameters(trainable_only=True) == 3_237_376
    assert sa.num_parameters(trainable_only=True) == 4_201_984
    assert da.num_parameters() - 3_237_376 == 150_747_746  # CLIPSeg rd64-refined: ~150M
    assert cris.num_parameters() == 146_849_122  # CRIS RN50: ~147M


def test_shared_attention_context_tokens_attend_to_each_other():
    from segicl.vlsm.prompt_learners import SharedAttentionLearner

    torch.manual_seed(0)
    learner = SharedAttentionLearner(text_dim=8, vision_dim=8, n_ctx=3, depth=1, nhead=2).eval()
    base = learner.mix(0)
    with torch.no_grad():
        learner.ctx[0, 0] += 1.0
    changed = learner.mix(0)
    assert not torch.allclose(base[0, 1:], changed[0, 1:])  # other tokens see token 0
    # The original layout ((1, n, d) into a batch_first=False layer) keeps tokens independent.
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=False).eval()
    ctx = torch.randn(1, 3, 16)
    moved = ctx.clone()
    moved[0, 0] += 1.0
    assert torch.allclose(layer(ctx)[0, 1:], layer(moved)[0, 1:])


def test_biomedclip_checkpoint_dir_loads(tmp_path):
    """A BiomedCLIP directory in open_clip's format (config + .bin + BERT tokenizer) loads, and the
    layer-by-layer towers reproduce the libraries' own forwards."""
    import json

    from segicl.vlsm.biomedclipseg import BiomedCLIPEncoders
    from segicl.vlsm.tokenizers import bert_tokenizer

    torch.manual_seed(0)
    tok = bert_tokenizer()
    vision = {"model_name": "vit_base_patch16_224", "image_size": 64,
              "trunk_kwargs": {"embed_dim": 64, "depth": 3, "num_heads": 1}}
    bert = {"vocab_size": len(tok), "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 1,
            "intermediate_size": 96, "max_position_embeddings": 80}
    enc = BiomedCLIPEncoders(32, vision, {"bert": bert, "context_length": 64}).eval()
    d = tmp_path / "biomedclip"
    d.mkdir()
    torch.save(enc.state_dict(), d / "open_clip_pytorch_model.bin")
    tok.save_pretrained(d)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 64, "timm_model_kwargs": vision["trunk_kwargs"]},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract", "hf_proj_type": "mlp",
                     "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 64},
    }}))
    model = build_vlsm("biomedclipseg", "decoder", {"pretrained": str(d), "image_size": 64,
                                                   "decoder": {"extract_layers": [0, 1, 2], "reduce_dim": 16}}).eval()
    assert model.config["arch"]["text"]["bert"]["num_attention_heads"] == 1  # inferred from shapes
    loaded = {k.removeprefix("net.encoders."): v for k, v in model.state_dict().items() if k.startswith("net.encoders.")}
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded[k], v), k
    from segicl.vlsm.towers import encode_text, encode_vision

    net = model.net
    ids = model.tokenize(["one small dark oval breast tumour"])
    with torch.no_grad():
        cond = encode_text(net.text_tower, ids["input_ids"], ids["attention_mask"])[0]
        ref = enc.text.proj(enc.text.transformer(**ids).last_hidden_state[:, 0])
        assert torch.allclose(cond, ref, atol=1e-5)
        px = torch.randn(1, 3, 64, 64)
        assert torch.allclose(encode_vision(net.vision_tower, px, [1])[1], enc.visual(px), atol=1e-5)


def test_biomedclipseg_d_takes_the_clipseg_decoder(tmp_path):
    torch.manual_seed(0)
    clipseg = tiny("clipseg", "e2e")
    clipseg.save_pretrained(tmp_path / "clipseg")
    model = tiny("biomedclipseg_d", "decoder", decoder_from=str(tmp_path / "clipseg"))
    src = clipseg.net.head.state_dict()
    for k, v in model.net.head.state_dict().items():
        assert torch.equal(v, src[k]), k
    random = tiny("biomedclipseg", "decoder")
    assert not torch.equal(random.net.head.decoder.film_mul.weight, src["decoder.film_mul.weight"])
    assert "decoder_from" not in model.config  # reloading needs no CLIPSeg checkpoint


def test_cris_checkpoints_load(tmp_path):
    torch.manual_seed(0)
    src = tiny("cris", "e2e").eval()
    state = {f"module.{k}": v for k, v in src.net.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "cris.pth")
    backbone = {k: v for k, v in src.net.backbone.state_dict().items() if ".connect." not in k}
    torch.save(backbone, tmp_path / "RN50.pt")
    full = tiny("cris", "decoder", checkpoint=str(tmp_path / "cris.pth")).eval()
    clip_only = tiny("cris", "decoder", clip_checkpoint=str(tmp_path / "RN50.pt"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tok = src.tokenize(["polyp", "tumour"])
    with torch.no_grad():
        assert torch.allclose(full(x, **tok), src(x, **tok), atol=1e-5)
    assert torch.equal(clip_only.net.backbone.token_embedding.weight, src.net.backbone.token_embedding.weight)
    with pytest.raises(ValueError, match="do not fit"):
        torch.save({"bogus.weight": torch.zeros(1)}, tmp_path / "bad.pth")
        tiny("cris", "e2e", checkpoint=str(tmp_path / "bad.pth"))


def test_invalid_requests_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a ViT"):
        tiny("cris", "vpt")
    with pytest.raises(ValueError, match="needs a ViT"):
        tiny("cris", "adapter_dense_vl")
    with pytest.raises(ValueError, match="unknown mode"):
        tiny("clipseg", "lora")
    with pytest.raises(ValueError, match="unknown VLSM"):
        build_vlsm("segformer", "e2e", {})
    with pytest.raises(ValueError, match="not 'cris'"):
        build_vlsm("cris", "e2e", CONFIGS / "clipseg_tiny.yaml")
    with pytest.raises(ValueError, match="exceeds the encoder depth"):
        tiny("clipseg", "vpt", prompt={"n_ctx": 2, "depth": 9})
    with pytest.raises(ValueError, match="not set"):
        build_vlsm("clipseg", "e2e", {"pretrained": "$SEGICL_SURELY_UNSET_VAR/x"})
    with pytest.raises(FileNotFoundError):
        build_vlsm("clipseg", "e2e", {"pretrained": str(tmp_path)})
    model = tiny("clipseg", "coop")
    with pytest.raises(ValueError, match="texts"):
        model.predict([Image.new("RGB", (4, 4))], [])
    assert model.text_length == 77 - 4  # room left for the 4 context vectors


def test_frozen_batchnorm_stays_in_eval_mode():
    model = tiny("cris", "coop").train()
    bn = model.net.backbone.visual.bn1
    assert not bn.training and model.net.learner.training
    assert tiny("cris", "e2e").train().net.backbone.visual.bn1.training


def test_deep_copy_keeps_dense_adapters_working():
    model = tiny("clipseg", "adapter_dense_vl").eval()
    clone = copy.deepcopy(model)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    tok = model.tokenize(["polyp"])
    with torch.no_grad():
        assert torch.allclose(model(x, **tok), clone(x, **tok), atol=1e-6)
        clone.net.adapters.vision_dense[0][0].fc2.bias.add_(1.0)
        assert not torch.allclose(model(x, **tok), clone(x, **tok), atol=1e-6)


@pytest.mark.parametrize("model_name, mode", [("clipseg", "maple"), ("biomedclipseg", "adapter_dense_vlc"), ("cris", "cocoop")])
def test_bf16_autocast_forward_backward(model_name, mode):
    """Mixed precision (the GPU recipe of seeds 002/003) works: masks follow the autocast dtype."""
    model = tiny(model_name, mode)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    tok = model.tokenize(["polyp", "two small polyps"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dice_bce_loss(model(x, **tok), (x[:, :1] > 0).float())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.trainable_parameters())


def test_seeded_build_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny("cris", "coop")
    assert torch.equal(torch.rand(3), expected)
    b = tiny("cris", "coop")
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), n
