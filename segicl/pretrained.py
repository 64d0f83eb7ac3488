"""Loading the paper preset's pretrained parts from local directories (no downloads, ever).

Three config fields point at local weights; each loader checks the path, refuses to fall back to
random weights, checks the checkpoint against the SegICL config and returns float32 modules on CPU
(bf16 / fp16 checkpoints are upcast; cast the whole model later, e.g. with accelerate mixed precision):

* ``vision.pretrained``: an open_clip checkpoint. Either a directory (optionally written
  ``local-dir:<dir>``) holding ``open_clip_config.json`` (``{"model_cfg": ...}``, as in the LAION
  releases) and one weights file (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``, ...),
  or a single weights file with ``vision.model_name`` naming an open_clip model config
  (``"ViT-bigG-14"``). Only the vision tower is built (no text tower), at ``image_size`` (the
  paper's 448 px, not open_clip's default 224): the position embedding is interpolated to the new
  patch grid, as open_clip does for ``force_image_size``.
* ``lm.pretrained``: a transformers Qwen2 directory (``config.json`` + ``*.safetensors`` / ``*.bin``).
  A ``Qwen2ForCausalLM`` checkpoint gives its base ``Qwen2Model`` (``lm_head`` is dropped).
* ``decoder.pretrained``: a diffusers Stable Diffusion directory with ``unet/`` and ``vae/``
  (``config.json`` + ``diffusion_pytorch_model[.fp16].safetensors``); the ControlNet is initialised
  from the UNet (``ControlNetModel.from_unet``), so no ControlNet checkpoint is needed.

Errors: a missing path, or a directory without weights, raises ``FileNotFoundError`` naming the
config field; a checkpoint whose sizes disagree with the config (or whose weights do not fill the
model) raises ``ValueError`` naming the part.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from segicl.config import SegICLConfig

OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                     "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "model.pth")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                     "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")


def _existing(spec: str | None, field: str, what: str) -> Path:
    if not spec:
        raise FileNotFoundError(f"{field} is not set: it must name {what}")
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{field} = {spec!r}: not found (expected {what}; point {field} at your local copy)")
    return path


def _mismatch(part: str, pairs: dict[str, tuple[Any, Any]], source: str) -> None:
    bad = [f"{part}.{k} = {a!r}, checkpoint {b!r}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise ValueError(f"{part}: the SegICL config does not match the checkpoint {source}: " + "; ".join(bad))


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# ---------------------------------------------------------------------------------------- open_clip
def _open_clip_source(cfg: SegICLConfig) -> tuple[dict[str, Any], Path, str]:
    """(open_clip model_cfg, weights file, description) for ``vision.pretrained`` / ``vision.model_name``."""
    from open_clip import get_model_config

    v = cfg.vision
    spec = v.pretrained[len("local-dir:"):] if v.pretrained and v.pretrained.startswith("local-dir:") else v.pretrained
    what = "a local open_clip directory (open_clip_config.json + weights) or a weights file with vision.model_name"
    path = _existing(spec, "vision.pretrained", what)
    model_cfg = None
    if path.is_dir():
        cfg_file = path / "open_clip_config.json"
        if cfg_file.is_file():
            data = json.loads(cfg_file.read_text())
            model_cfg = data.get("model_cfg", data)
            source = str(cfg_file)
        elif v.model_name:
            model_cfg, source = get_model_config(v.model_name), f"open_clip config {v.model_name!r}"
        else:
            raise FileNotFoundError(f"vision.pretrained = {spec!r}: no open_clip_config.json in the directory and "
                                    "vision.model_name is not set, so the architecture is unknown")
        found = [path / n for n in OPEN_CLIP_WEIGHTS if (path / n).is_file()]
        if not found:
            found = sorted(p for ext in ("*.safetensors", "*.bin", "*.pth", "*.pt") for p in path.glob(ext))
        if not found:
            raise FileNotFoundError(f"vision.pretrained = {spec!r}: no weights file in the directory (expected one of "
                                    f"{', '.join(OPEN_CLIP_WEIGHTS[:3])}, ...); refusing to build a random vision tower")
        weights = found[0]
    else:
        if not v.model_name:
            raise ValueError(f"vision.pretrained = {spec!r} is a file: set vision.model_name to its open_clip "
                             "model config (e.g. 'ViT-bigG-14')")
        model_cfg, source, weights = get_model_config(v.model_name), f"open_clip config {v.model_name!r}", path
    if model_cfg is None:
        raise ValueError(f"vision.model_name = {v.model_name!r}: not an open_clip model config")
    return model_cfg, weights, source


def load_vision_tower(cfg: SegICLConfig) -> nn.Module:
    """The open_clip ``VisionTransformer`` of ``vision.pretrained``, at ``cfg.image_size``, float32,
    returning (pooled, patch tokens)."""
    from open_clip.factory import load_state_dict
    from open_clip.model import _build_vision_tower, resize_pos_embed

    model_cfg, weights, source = _open_clip_source(cfg)
    vc = dict(model_cfg["vision_cfg"])
    if vc.get("timm_model_name") or not isinstance(vc.get("layers"), int):
        raise ValueError(f"vision: {source} is not an open_clip VisionTransformer (timm / ResNet towers are not supported)")
    v = cfg.vision
    width, head_width = vc.get("width", 768), vc.get("head_width", 64)
    _mismatch("vision", {
        "width": (v.width, width), "layers": (v.layers, vc["layers"]), "heads": (v.heads, width // head_width),
        "patch_size": (v.patch_size, vc.get("patch_size", 16)), "embed_dim": (v.embed_dim, model_cfg["embed_dim"]),
        "mlp_ratio": (int(v.width * v.mlp_ratio), int(width * vc.get("mlp_ratio", 4.0))),
    }, source)
    vc["image_size"] = cfg.image_size  # build at the preset's size; the position embedding is resized below
    vc["output_tokens"] = True
    visual = _build_vision_tower(model_cfg["embed_dim"], vc, quick_gelu=model_cfg.get("quick_gelu", False))
    state = load_state_dict(str(weights), weights_only=True)
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: t for k, t in state.items() if k.startswith("visual.")}
    state = _fp32(state)  # bf16 / fp16 checkpoints; interpolation below needs float32 on CPU anyway
    if "positional_embedding" in state:
        holder = {"visual.positional_embedding": state["positional_embedding"]}
        resize_pos_embed(holder, SimpleNamespace(visual=visual))
        state["positional_embedding"] = holder["visual.positional_embedding"]
    try:
        visual.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"vision: the weights {weights} do not fit the tower of {source}: {e}") from None
    return visual


# ---------------------------------------------------------------------------------------- Qwen2
def load_lm(cfg: SegICLConfig, vocab_size: int):
    """The base ``Qwen2Model`` of ``lm.pretrained`` in float32 (``vocab_size``: the tokenizer's size)."""
    import transformers
    from transformers import AutoConfig, Qwen2Model

    lm = cfg.lm
    root = _existing(lm.pretrained, "lm.pretrained", "a local Qwen2 directory (config.json + *.safetensors)")
    if not root.is_dir() or not (root / "config.json").is_file():
        raise FileNotFoundError(f"lm.pretrained = {lm.pretrained!r}: not a transformers checkpoint directory (no config.json)")
    if not any((root / n).is_file() for n in HF_WEIGHTS):
        raise FileNotFoundError(f"lm.pretrained = {lm.pretrained!r}: no weights in the directory (expected one of "
                                f"{', '.join(HF_WEIGHTS)}); refusing to build a random language model")
    qcfg = AutoConfig.from_pretrained(root, local_files_only=True)
    if qcfg.model_type != "qwen2":
        raise ValueError(f"lm: {root}/config.json is model_type {qcfg.model_type!r}, expected 'qwen2'")
    _mismatch("lm", {k: (getattr(lm, k), getattr(qcfg, k)) for k in (
        "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size")},
        f"{root}/config.json")
    if vocab_size > qcfg.vocab_size:
        raise ValueError(f"lm: the tokenizer ({lm.tokenizer}) has {vocab_size} tokens, the embedding of {root} only "
                         f"{qcfg.vocab_size} rows")
    # transformers >= 5 loads in the checkpoint's dtype ("auto") unless told: force float32
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model, info = Qwen2Model.from_pretrained(str(root), local_files_only=True, output_loading_info=True,
                                             **{dtype_kw: torch.float32})
    unexpected = [k for k in info.get("unexpected_keys", ()) if not k.startswith("lm_head.")]
    if info.get("missing_keys") or info.get("mismatched_keys") or unexpected:
        raise ValueError(f"lm: the weights in {root} do not fill Qwen2Model (missing {sorted(info.get('missing_keys', ()))[:5]}, "
                         f"mismatched {list(info.get('mismatched_keys', ()))[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------------------------------- Stable Diffusion
def _diffusers_variant(sub: Path, spec: str) -> str | None:
    if not (sub / "config.json").is_file():
        raise FileNotFoundError(f"decoder.pretrained = {spec!r}: {sub.name}/config.json missing (expected a diffusers "
                                "Stable Diffusion directory with unet/ and vae/)")
    if any((sub / n).is_file() for n in DIFFUSERS_WEIGHTS):
        return None
    for variant in ("fp16", "bf16", "fp32"):
        if any((sub / n.replace("diffusion_pytorch_model.", f"diffusion_pytorch_model.{variant}.")).is_file()
               for n in DIFFUSERS_WEIGHTS):
            return variant
    raise FileNotFoundError(f"decoder.pretrained = {spec!r}: no weights in {sub.name}/ (expected "
                            f"{DIFFUSERS_WEIGHTS[0]} or .bin); refusing to build a random {sub.name}")


def _diffusers_part(cls, root: Path, sub: str, spec: str):
    variant = _diffusers_variant(root / sub, spec)
    model, info = cls.from_pretrained(str(root), subfolder=sub, variant=variant, torch_dtype=torch.float32,
                                      output_loading_info=True)
    if info.get("missing_keys") or info.get("mismatched_keys") or info.get("unexpected_keys"):
        raise ValueError(f"decoder: the weights in {root / sub} do not fill {cls.__name__} (missing "
                         f"{list(info.get('missing_keys', ()))[:5]}, mismatched {list(info.get('mismatched_keys', ()))[:5]}, "
                         f"unexpected {list(info.get('unexpected_keys', ()))[:5]})")
    return model


def load_stable_diffusion(cfg: SegICLConfig):
    """(unet, controlnet, vae) from ``decoder.pretrained``; the ControlNet is a copy of the UNet's encoder
    with a hint embedding of ``decoder.hint_channels`` taking ``cfg.hint_size`` px images."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel

    d = cfg.decoder
    root = _existing(d.pretrained, "decoder.pretrained", "a local Stable Diffusion directory with unet/ and vae/")
    for sub in ("unet", "vae"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"decoder.pretrained = {d.pretrained!r}: no {sub}/ subdirectory (expected a diffusers "
                                    "Stable Diffusion directory with unet/ and vae/)")
    unet = _diffusers_part(UNet2DConditionModel, root, "unet", d.pretrained)
    vae = _diffusers_part(AutoencoderKL, root, "vae", d.pretrained)
    u, a = unet.config, vae.config
    _mismatch("decoder", {
        "block_out_channels": (tuple(d.block_out_channels), tuple(u.block_out_channels)),
        "layers_per_block": (d.layers_per_block, u.layers_per_block),
        "down_block_types": (tuple(d.down_block_types), tuple(u.down_block_types)),
        "up_block_types": (tuple(d.up_block_types), tuple(u.up_block_types)),
        "latent_channels": (d.latent_channels, a.latent_channels),
        "vae_block_out_channels": (tuple(d.vae_block_out_channels), tuple(a.block_out_channels)),
    }, str(root))
    if u.cross_attention_dim != cfg.condition.dim:
        raise ValueError(f"decoder: {root}/unet cross-attends to {u.cross_attention_dim}-d tokens but condition.dim "
                         f"is {cfg.condition.dim}")
    if u.in_channels != a.latent_channels or u.out_channels != a.latent_channels:
        raise ValueError(f"decoder: {root}/unet has {u.in_channels} -> {u.out_channels} channels, the VAE latent "
                         f"{a.latent_channels}")
    latent = cfg.mask_size // 2 ** (len(a.block_out_channels) - 1)
    if latent != u.sample_size:
        raise ValueError(f"decoder: mask_size {cfg.mask_size} gives a {latent}px latent, {root}/unet expects "
                         f"{u.sample_size}px")
    embedded = cfg.hint_size // 2 ** (len(d.hint_channels) - 1)
    if embedded != u.sample_size:
        raise ValueError(f"decoder: the ControlNet hint embedding (decoder.hint_channels, {len(d.hint_channels) - 1} "
                         f"downsamples) maps a {cfg.hint_size}px hint to {embedded}px, the UNet latent is "
                         f"{u.sample_size}px: set decoder.hint_size to {u.sample_size * 2 ** (len(d.hint_channels) - 1)}")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(d.hint_channels))
    return unet, controlnet, vae
