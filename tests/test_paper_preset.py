"""The paper preset (configs/model/paper.json) and its loading path for real checkpoints.

No weights can be downloaded here, so the test writes tiny models in the real on-disk formats
(open_clip directory with open_clip_config.json + safetensors in bf16, a transformers
Qwen2ForCausalLM directory in bf16 with a Qwen2 tokenizer, a diffusers Stable Diffusion directory
with unet/ in fp16 and vae/) and loads them through the code the paper preset uses, with the paper
preset's sizes overridden to tiny ones ("mini paper").
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from segicl import pretrained
from segicl.config import SegICLConfig, load_preset
from segicl.encoder import build_tokenizer
from segicl.pipeline import SegICLPipeline

torch.set_num_threads(1)

VISION_CFG = {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "mlp_ratio": 2.0, "patch_size": 14}
TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}


def mini_overrides(root) -> dict:
    """paper.json with tiny sizes; paths into ``root`` (written by the ``weights`` fixture)."""
    return {
        "image_size": 56, "mask_size": 64, "k_max": 2,
        "vision": {"width": 32, "layers": 2, "heads": 2, "patch_size": 14, "mlp_ratio": 2.0, "embed_dim": 16,
                   "pool_to": 2, "pretrained": f"local-dir:{root / 'clip'}"},
        "lm": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "intermediate_size": 128, "pretrained": str(root / "qwen"), "tokenizer": f"hf:{root / 'qwen'}",
               "max_text_tokens": 16},
        "condition": {"patch_size": 16, "dim": 32, "hidden": 64},
        "decoder": {"block_out_channels": [32, 64], "layers_per_block": 1,
                    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "norm_num_groups": 8,
                    "hint_channels": [8, 16], "hint_size": 64, "vae_block_out_channels": [32, 64],
                    "pretrained": str(root / "sd")},
        "scheduler": {"num_inference_steps": 2},
    }


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Tiny open_clip / Qwen2 / Stable Diffusion checkpoints in their real formats; returns (root, saved tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from open_clip.model import CLIP
    from safetensors.torch import save_file
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    saved = {}
    # open_clip: a full CLIP state dict (visual.* + text tower), bf16, trained at 28 px (2 x 2 patch grid)
    clip = CLIP(embed_dim=16, vision_cfg=VISION_CFG, text_cfg=TEXT_CFG)
    (root / "clip").mkdir()
    (root / "clip" / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": {"embed_dim": 16, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}, "preprocess_cfg": {}}))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(root / "clip" / "open_clip_model.safetensors"))
    saved["vision.conv1.weight"] = state["visual.conv1.weight"].float()
    # Qwen2: byte-level BPE tokenizer in Qwen2Tokenizer format + a Qwen2ForCausalLM in bf16 (vocab padded
    # beyond the tokenizer, as Qwen2-7B's 152064 rows for ~151.6k tokens)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Qwen2Tokenizer(vocab={"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}, merges=[])
    tok.save_pretrained(root / "qwen")
    qcfg = Qwen2Config(vocab_size=len(tok) + 7, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, rope_theta=1e6, tie_word_embeddings=False)
    lm = Qwen2ForCausalLM(qcfg).to(torch.bfloat16)
    lm.save_pretrained(root / "qwen")
    saved["lm.layers.0.self_attn.q_proj.weight"] = lm.model.layers[0].self_attn.q_proj.weight.detach().float().clone()
    # Stable Diffusion layout: unet/ (fp16) and vae/ (fp32), 64 px masks -> 32 px latent
    unet = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet.half().save_pretrained(root / "sd" / "unet")
    vae.save_pretrained(root / "sd" / "vae")
    saved["unet.conv_in.weight"] = unet.conv_in.weight.detach().float().clone()
    saved["vae.encoder.conv_in.weight"] = vae.encoder.conv_in.weight.detach().clone()
    return root, saved


@pytest.fixture(scope="module")
def mini(weights):
    root, _ = weights
    cfg = load_preset("paper", **mini_overrides(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = SegICLPipeline.from_config(cfg, seed=0)
    return pipe


def _img(seed, h=70, w=90):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ the preset
def test_paper_preset_loads_with_the_paper_sizes():
    cfg = load_preset("paper")
    v, lm, d, s = cfg.vision, cfg.lm, cfg.decoder, cfg.scheduler
    assert (cfg.image_size, cfg.mask_size) == (448, 512)
    assert (v.model_name, v.width, v.layers, v.patch_size) == ("ViT-bigG-14", 1664, 48, 14)
    assert ((cfg.image_size // v.patch_size) ** 2, v.pool_to**2) == (1024, 256)  # 32 x 32 patches pooled to 16 x 16
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.num_key_value_heads,
            lm.intermediate_size, lm.rope_theta) == (3584, 28, 28, 4, 18944, 1e6)
    assert lm.tokenizer.startswith("hf:") and lm.pretrained
    assert lm.lora["r"] == 16 and lm.lora["lora_alpha"] == 32
    assert set(lm.lora["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert (cfg.num_condition_tokens, cfg.condition.dim, cfg.condition.patch_size) == (256, 768, 32)
    assert d.space == "latent" and d.cond_map_channels == 0 and d.pretrained
    latent = cfg.mask_size // 2 ** (len(d.vae_block_out_channels) - 1)
    assert latent == 64 and cfg.hint_size == 512 and cfg.hint_size // 2 ** (len(d.hint_channels) - 1) == latent
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.prediction_type) == ("scaled_linear", 0.00085, 0.012, "epsilon")
    assert SegICLConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_merge_sections_field_by_field():
    base = load_preset("paper")
    cfg = load_preset("paper", lm={"pretrained": "/x/qwen"}, image_size=224)
    assert cfg.lm.pretrained == "/x/qwen" and cfg.image_size == 224
    assert cfg.lm.hidden_size == base.lm.hidden_size and cfg.lm.lora == base.lm.lora
    assert cfg.vision == base.vision
    tiny = load_preset("tiny", decoder={"cond_noise": 0.0})
    assert tiny.decoder.cond_noise == 0.0 and tiny.decoder.block_out_channels == load_preset("tiny").decoder.block_out_channels
    assert tiny.decoder.hint_size is None and tiny.hint_size == tiny.image_size
    with pytest.raises(ValueError, match="unknown keys"):
        load_preset("paper", lm={"bogus": 1})


def test_paper_architecture_shapes_on_meta_device():
    """The full-size parts, built without weights (meta tensors): ViT at 448 px -> 32 x 32 tokens,
    Qwen2-7B parameter count, SD 1.5 UNet + ControlNet taking a 512 px hint and 768-d tokens."""
    from diffusers import ControlNetModel, UNet2DConditionModel
    from open_clip import get_model_config
    from open_clip.model import _build_vision_tower
    from transformers import Qwen2Config, Qwen2Model

    cfg = load_preset("paper")
    with torch.device("meta"):
        mc = get_model_config(cfg.vision.model_name)
        visual = _build_vision_tower(mc["embed_dim"], {**mc["vision_cfg"], "image_size": cfg.image_size, "output_tokens": True})
        pooled, tokens = visual(torch.empty(1, 3, 448, 448))
        lm = Qwen2Model(Qwen2Config(vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                    num_key_value_heads=4, intermediate_size=18944))
        d = cfg.decoder
        unet = UNet2DConditionModel(sample_size=64, block_out_channels=tuple(d.block_out_channels), cross_attention_dim=768,
                                    down_block_types=tuple(d.down_block_types), up_block_types=tuple(d.up_block_types))
        cn = ControlNetModel(block_out_channels=tuple(d.block_out_channels), cross_attention_dim=768,
                             conditioning_embedding_out_channels=tuple(d.hint_channels))
        down, mid = cn(torch.empty(1, 4, 64, 64), torch.tensor([10]), encoder_hidden_states=torch.empty(1, 256, 768),
                       controlnet_cond=torch.empty(1, 3, 512, 512), return_dict=False)
        out = unet(torch.empty(1, 4, 64, 64), torch.tensor([10]), encoder_hidden_states=torch.empty(1, 256, 768),
                   down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert tokens.shape == (1, 1024, cfg.vision.width) and pooled.shape == (1, cfg.vision.embed_dim)
    assert visual.positional_embedding.shape[0] == 1025
    n_lm = sum(p.numel() for p in lm.parameters())
    assert 7.0e9 < n_lm < 7.2e9  # Qwen2-7B without lm_head: 7.07 B
    assert 0.85e9 < sum(p.numel() for p in unet.parameters()) < 0.87e9  # SD 1.5 UNet: 860 M
    assert out.shape == (1, 4, 64, 64)


# ------------------------------------------------------------------------------------------ mini paper
def test_mini_paper_loads_the_saved_weights(mini, weights):
    _, saved = weights
    enc, dec = mini.encoder, mini.decoder
    assert enc.vision.image_size == (56, 56)  # built at the preset's size, not the checkpoint's 28 px
    assert enc.vision.positional_embedding.shape[0] == 1 + 4 * 4  # interpolated from 2 x 2 to 4 x 4
    assert torch.equal(enc.vision.conv1.weight, saved["vision.conv1.weight"])
    assert torch.equal(enc.lm.layers[0].self_attn.q_proj.weight, saved["lm.layers.0.self_attn.q_proj.weight"])
    assert type(enc.lm).__name__ == "Qwen2Model"  # the base model of the saved Qwen2ForCausalLM
    assert torch.equal(dec.unet.conv_in.weight, saved["unet.conv_in.weight"])
    assert torch.equal(dec.vae.encoder.conv_in.weight, saved["vae.encoder.conv_in.weight"])
    assert torch.equal(dec.controlnet.conv_in.weight, dec.unet.conv_in.weight)  # ControlNet.from_unet
    for m in (enc, dec):  # bf16 / fp16 checkpoints come out float32
        assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert enc.tokenizer.vocab_size == 257 and enc.lm.config.vocab_size == 264
    ids = enc.tokenize(["Segment the polyp."])[0].tolist()
    assert len(ids) == 16 and enc.tokenizer.tok.decode(ids) == "Segment the poly"  # truncated at max_text_tokens


def test_mini_paper_segments_end_to_end(mini):
    from segicl.data.transforms import image_to_tensor

    x = image_to_tensor(_img(0), 56)[None]
    hint = mini.decoder.hint(x)  # 56 px image -> 64 px hint (decoder.hint_size)
    assert hint.shape == (1, 3, 64, 64) and hint.abs().max() <= 1.0 + 1e-5
    m = np.zeros((70, 90), bool)
    m[20:50, 30:60] = True
    out = mini([_img(1), _img(2, 40, 50)], text="Segment the polyp in this endoscopy image.",
               supports=[[(_img(3), m)], []], num_samples=2, generator=torch.Generator().manual_seed(0))
    assert out.probabilities[0].shape == (70, 90) and out.masks[1].shape == (40, 50)
    for p, u in zip(out.probabilities, out.uncertainty):
        assert np.isfinite(p).all() and p.min() >= 0 and p.max() <= 1 and (u >= 0).all()


def test_mini_paper_lora_trains_adapters_and_projectors_only(mini, tmp_path):
    import copy

    from training.stage2 import Stage2Task, apply_lora

    pipe = copy.deepcopy(mini)
    apply_lora(pipe, pipe.config.lm.lora)
    task = Stage2Task(pipe, {"lr": 1e-3})
    names = {n for n, p in task.named_parameters() if p.requires_grad}
    lora = {n for n in names if ".lora_" in n}
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    heads = {n.split(".")[1] for n in names - lora}
    assert heads <= {"image_proj", "mask_proj", "markers", "slots", "out_proj"}, heads
    assert not any(n.startswith("encoder.vision.") for n in names)
    q = torch.rand(1, 3, 56, 56) * 2 - 1
    with torch.no_grad():
        before = pipe.encoder(["a"], q)
    assert torch.allclose(before, mini.encoder(["a"], q), atol=1e-5)  # LoRA B = 0: same output before training
    # the merged save reloads through the same local directories and gives the same S
    task.save_pretrained(tmp_path / "ck")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = SegICLPipeline.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        assert torch.allclose(loaded.encoder(["a"], q), before, atol=1e-5)


# ------------------------------------------------------------------------------------------ errors
def _cfg(root, **sections):
    over = mini_overrides(root)
    for k, v in sections.items():
        over[k] = {**over.get(k, {}), **v}
    return load_preset("paper", **over)


def test_missing_paths_name_the_field(weights, tmp_path):
    root, _ = weights
    with pytest.raises(FileNotFoundError, match="vision.pretrained"):
        pretrained.load_vision_tower(_cfg(root, vision={"pretrained": str(tmp_path / "nope")}))
    with pytest.raises(FileNotFoundError, match="lm.pretrained"):
        pretrained.load_lm(_cfg(root, lm={"pretrained": str(tmp_path / "nope")}), 257)
    with pytest.raises(FileNotFoundError, match="decoder.pretrained"):
        pretrained.load_stable_diffusion(_cfg(root, decoder={"pretrained": str(tmp_path / "nope")}))
    with pytest.raises(FileNotFoundError, match="lm.tokenizer"):
        build_tokenizer(f"hf:{tmp_path / 'nope'}")
    with pytest.raises(FileNotFoundError, match="lm.tokenizer"):
        build_tokenizer(f"hf:{tmp_path}")  # a directory without tokenizer files
    with pytest.raises(FileNotFoundError, match="decoder.pretrained"):  # the placeholder paths of paper.json
        pretrained.load_stable_diffusion(load_preset("paper"))


def test_directories_without_weights_refuse_random_init(weights, tmp_path):
    root, _ = weights
    (tmp_path / "clip").mkdir()
    shutil.copy(root / "clip" / "open_clip_config.json", tmp_path / "clip")
    with pytest.raises(FileNotFoundError, match="vision.pretrained.*no weights"):
        pretrained.load_vision_tower(_cfg(root, vision={"pretrained": f"local-dir:{tmp_path / 'clip'}"}))
    (tmp_path / "qwen").mkdir()
    shutil.copy(root / "qwen" / "config.json", tmp_path / "qwen")
    with pytest.raises(FileNotFoundError, match="lm.pretrained.*no weights"):
        pretrained.load_lm(_cfg(root, lm={"pretrained": str(tmp_path / "qwen")}), 257)
    for sub in ("unet", "vae"):
        (tmp_path / "sd" / sub).mkdir(parents=True)
        shutil.copy(root / "sd" / sub / "config.json", tmp_path / "sd" / sub)
    shutil.copy(root / "sd" / "vae" / "diffusion_pytorch_model.safetensors", tmp_path / "sd" / "vae")
    with pytest.raises(FileNotFoundError, match="decoder.pretrained.*no weights in unet"):
        pretrained.load_stable_diffusion(_cfg(root, decoder={"pretrained": str(tmp_path / "sd")}))


def test_incomplete_weights_raise_instead_of_random_init(weights, tmp_path):
    from safetensors.torch import load_file, save_file

    root, _ = weights
    shutil.copytree(root / "sd", tmp_path / "sd")
    f = tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    del state["conv_in.weight"]
    save_file(state, str(f))
    with pytest.raises(ValueError, match="decoder: .*missing.*conv_in.weight"):
        pretrained.load_stable_diffusion(_cfg(root, decoder={"pretrained": str(tmp_path / "sd")}))


def test_size_mismatches_name_the_part(weights):
    root, _ = weights
    with pytest.raises(ValueError, match=r"vision: .*vision.width = 48, checkpoint 32"):
        pretrained.load_vision_tower(_cfg(root, vision={"width": 48, "heads": 3}))
    with pytest.raises(ValueError, match=r"lm: .*lm.hidden_size = 96, checkpoint 64"):
        pretrained.load_lm(_cfg(root, lm={"hidden_size": 96}), 257)
    with pytest.raises(ValueError, match="lm: the tokenizer"):
        pretrained.load_lm(_cfg(root), 10_000)
    with pytest.raises(ValueError, match=r"decoder: .*condition.dim is 48"):
        pretrained.load_stable_diffusion(_cfg(root, condition={"dim": 48}))
    with pytest.raises(ValueError, match=r"decoder: .*decoder.block_out_channels"):
        pretrained.load_stable_diffusion(_cfg(root, decoder={"block_out_channels": [32, 96]}))
    with pytest.raises(ValueError, match=r"decoder: .*set decoder.hint_size to 64"):
        pretrained.load_stable_diffusion(_cfg(root, decoder={"hint_size": 56}))


def test_vision_file_with_model_name(weights, tmp_path):
    """vision.pretrained = a weights file + vision.model_name = an open_clip model config."""
    import open_clip

    root, saved = weights
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "segicl-test-vit.json").write_text(json.dumps({"embed_dim": 16, "vision_cfg": VISION_CFG,
                                                                         "text_cfg": TEXT_CFG}))
    open_clip.add_model_config(tmp_path / "cfgs")
    cfg = _cfg(root, vision={"model_name": "segicl-test-vit", "pretrained": str(root / "clip" / "open_clip_model.safetensors")})
    visual = pretrained.load_vision_tower(cfg)
    assert torch.equal(visual.conv1.weight, saved["vision.conv1.weight"])
    with pytest.raises(ValueError, match="vision.model_name"):
        pretrained.load_vision_tower(_cfg(root, vision={"model_name": None,
                                                        "pretrained": str(root / "clip" / "open_clip_model.safetensors")}))


def test_training_tasks_take_pairs_at_image_size(mini):
    """The training data gives masks at image_size (56 here, 448 in the paper); the tasks resize them
    to mask_size (64 / 512) for the condition encoder and the VAE."""
    import copy

    from training.stage1 import Stage1Task
    from training.stage2 import Stage2Task
    from training.stage3 import Stage3Task

    torch.manual_seed(0)
    img = torch.rand(2, 3, 56, 56) * 2 - 1
    mask = torch.zeros(2, 1, 56, 56)
    mask[:, :, 10:30, 20:40] = 1
    loss = Stage1Task(copy.deepcopy(mini), {})({"image": img, "mask": mask})
    assert torch.isfinite(loss["loss"])
    episode = {"query_image": img, "query_mask": mask, "support_images": img[:, None], "support_masks": mask[:, None],
               "num_supports": torch.tensor([1, 0]), "text": ["Segment the polyp.", ""]}
    with torch.no_grad():
        assert torch.isfinite(Stage2Task(copy.deepcopy(mini), {})(episode)["loss"])
        assert torch.isfinite(Stage3Task(copy.deepcopy(mini), {})(episode)["loss"])


def test_sharded_lm_and_fp16_variant_layouts(weights, tmp_path):
    """A sharded Qwen2 checkpoint (model-*.safetensors + index) and a UNet saved only as the diffusers
    fp16 variant (diffusion_pytorch_model.fp16.safetensors), as in the SD 1.5 release."""
    from transformers import Qwen2ForCausalLM

    root, saved = weights
    Qwen2ForCausalLM.from_pretrained(str(root / "qwen")).save_pretrained(tmp_path / "qwen", max_shard_size="100KB")
    assert (tmp_path / "qwen" / "model.safetensors.index.json").is_file()
    lm = pretrained.load_lm(_cfg(root, lm={"pretrained": str(tmp_path / "qwen")}), 257)
    assert torch.equal(lm.layers[0].self_attn.q_proj.weight, saved["lm.layers.0.self_attn.q_proj.weight"])
    shutil.copytree(root / "sd", tmp_path / "sd")
    unet_dir = tmp_path / "sd" / "unet"
    (unet_dir / "diffusion_pytorch_model.safetensors").rename(unet_dir / "diffusion_pytorch_model.fp16.safetensors")
    unet, _, _ = pretrained.load_stable_diffusion(_cfg(root, decoder={"pretrained": str(tmp_path / "sd")}))
    assert torch.equal(unet.conv_in.weight, saved["unet.conv_in.weight"])
