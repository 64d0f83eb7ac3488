"""SegICL model configuration and presets.

A :class:`SegICLConfig` describes every part of the model (vision tower, language model, condition
encoder, diffusion decoder, scheduler, sampling defaults). Presets are data: JSON files in
``configs/model/<name>.json`` (``tiny``, ``small``, ``paper``), loaded with :func:`load_preset`.
A saved pipeline carries its own config.json, so inference never needs the preset files.

Fields that point at local weights (``vision.pretrained``, ``lm.pretrained``, ``lm.tokenizer =
"hf:<dir>"``, ``decoder.pretrained``) are only used by the paper preset and loaded by
:mod:`segicl.pretrained`; there the size fields must match the checkpoints (checked on load). Tiny
and small are random-init models that train from scratch on CPU.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segicl import CONFIGS_DIR

PRESET_DIRS = (CONFIGS_DIR / "model",)


@dataclass
class VisionConfig:
    """open_clip ViT vision tower (``CLIPVisionCfg`` fields) or a local open_clip model."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    patch_size: int = 8
    mlp_ratio: float = 4.0
    embed_dim: int = 128  # pooled embedding (used for retrieval)
    pool_to: int = 4  # patch grid average-pooled to pool_to x pool_to tokens per image in the LM
    model_name: str | None = None  # open_clip model name for real weights, e.g. "ViT-bigG-14"
    pretrained: str | None = None  # local checkpoint file / directory for model_name


@dataclass
class LMConfig:
    """transformers Qwen2 configuration (random init) or a local Qwen2 checkpoint directory."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 688
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    pretrained: str | None = None  # local Qwen2 directory (paper preset)
    tokenizer: str = "bytes"  # "bytes" (shipped byte-level tokenizer) or "hf:<local dir>"
    max_text_tokens: int = 64
    lora: dict[str, Any] | None = None  # peft LoraConfig kwargs for stage 2 (paper preset)
    # How the sequence is laid out (see segicl/encoder.py):
    slot_init: str = "learned"  # "learned" (paper) | "query": slot i = learned slot i + the query's image
    #   feature at condition-grid cell i (each slot starts from the pixels it must label)
    support_tokens: str = "interleaved"  # "interleaved" (paper: <img> image tokens <mask> mask tokens) |
    #   "fused": <img> (image token + mask token) per grid cell (a query cell finds a similar support
    #   cell and reads its label in one attention hop)
    support_prior: str = "none"  # "none" (paper) | "attention": a label-propagation prior from the supports
    #   (each query patch attends to the support patches by feature similarity and averages their mask
    #   values) is added to the slots, so the supports reach S through a path that needs no task memory
    #   | "propagation" (dense layout): the training-free label propagation of segicl/matching.py
    #   (``matching`` settings) enters each query token, so the learned matcher starts where it is
    dense_vision: bool = True  # dense layout: add the vision tower's patch token to each token (False: only the
    #   multi-scale patch features, standardised per image, so the matcher cannot key on a dataset's absolute look)
    dense_condition: str = "tokens"  # dense layout: what the decoder renders: "tokens" (the LM's condition map S)
    #   | "mask" (the condition encoder's tokens of the mask head's thresholded mask, as the route does with the
    #   propagation's mask: the decoder renders crisp tokens best, and S regressed by MSE is blurry)
    # support_tokens "dense" (issue 16): no pooled slots; every image gives its full patch grid (one token
    # per condition-grid cell: vision token + the multi-scale patch features of segicl/matching.py under
    # it + a 2-D position embedding), a support token adds an embedding of its cell's mask, and the LM's
    # outputs at the query's tokens are the condition map S (plus a per-pixel mask head)


@dataclass
class ConditionConfig:
    """The condition encoder ("shared teacher"): a 4-layer MLP over mask patches."""

    patch_size: int = 8  # N = (mask_size / patch_size) ** 2 tokens
    dim: int = 64  # d_c, width of each condition token
    hidden: int = 256
    layers: int = 4


@dataclass
class DecoderConfig:
    """diffusers UNet2DConditionModel + ControlNetModel over the mask (pixel space or a VAE latent)."""

    space: str = "pixel"  # "pixel" or "latent" (AutoencoderKL)
    unshuffle: int = 2  # pixel space: mask space-to-depth factor (1 = plain 1-channel mask)
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    norm_num_groups: int = 16
    hint_channels: tuple[int, ...] = (16, 32)  # ControlNet hint embedding; len-1 stride-2 downsamples
    # ControlNet hint resolution (the query image is resized to it); None = image_size. The paper preset
    # needs 512 (SD's ControlNet embeds the hint to the 64 x 64 latent) while its ViT sees 448 px.
    hint_size: int | None = None
    vae_block_out_channels: tuple[int, ...] = (32, 64)
    latent_channels: int = 4
    pretrained: str | None = None  # local Stable Diffusion directory (unet/, vae/) for the paper preset
    cond_map_channels: int = 4  # C also enters spatially: tokens -> linear -> pixel-shuffle map, concatenated to x_t
    cond_dropout: float = 0.1  # stage 1: drop C (null condition) with this probability
    cond_noise: float = 0.2  # stage 1: Gaussian noise on C (x its RMS): makes the decoder read the image


@dataclass
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    beta_start: float = 0.0001  # used by "linear" / "scaled_linear" (SD 1.5: 0.00085 - 0.012); the
    beta_end: float = 0.02  # defaults are diffusers' DDPMScheduler defaults, so older configs load unchanged
    prediction_type: str = "sample"  # "epsilon" (paper eq. 6), "sample" or "v_prediction"
    sampler: str = "ddim"  # "ddim" or "dpm" (DPMSolverMultistepScheduler)
    num_inference_steps: int = 10
    num_samples: int = 1


FEATURES = ("colour", "multiscale")  # patch feature sets of segicl/matching.py


def _check_features(section: str, features: str, max_support_patches: int | None) -> None:
    if features not in FEATURES:
        raise ValueError(f"{section}.features must be one of {FEATURES}, not {features!r}")
    if max_support_patches is not None and max_support_patches < 1:
        raise ValueError(f"{section}.max_support_patches must be a positive number or null, not {max_support_patches}")


@dataclass
class MatchingConfig:
    """Training-free label propagation from the supports (segicl/matching.py)."""

    mode: str = "none"  # "none" (paper: the supports reach the mask only through the LM's S) | "route":
    #   with k >= 1 supports the condition tokens are the condition encoder's tokens of the label-propagation
    #   mask (thresholded at ``threshold``) and the decoder renders that; k = 0 keeps the LM's S
    grid: int = 32  # patches per side of the matching grid (2 px patches at 64 px)
    scale: float = 100.0  # softmax inverse temperature on cosine similarity
    position: float = 1.0  # weight of the (y, x) patch position in the features (0 = appearance only)
    top_k: int | None = 20  # support patches each query patch votes over (None = all)
    balanced: bool = True  # divide the votes by the supports' foreground / background fractions
    features: str = "colour"  # "colour" (15 dims) or "multiscale" (+ local contrast and Hessian ridges)
    max_support_patches: int | None = None  # vote over at most this many support patches (None = all)

    def validate(self, image_size: int, active: bool) -> None:
        """Check the fields; ``active``: matching will run on ``image_size`` images (then the grid must fit)."""
        if self.mode not in ("none", "route"):
            raise ValueError(f"matching.mode must be 'none' or 'route', not {self.mode!r}")
        if active and not 1 <= self.grid <= image_size // 2:
            raise ValueError(f"matching.grid must be in 1..image_size/2 = {image_size // 2}, not {self.grid}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"matching.top_k must be a positive number or null, not {self.top_k}")
        _check_features("matching", self.features, self.max_support_patches)


@dataclass
class FineConfig:
    """Native-resolution label propagation for structures the coarse grid cannot hold (segicl/native.py).

    The voting settings (scale, position, top_k, balanced) are ``matching``'s."""

    mode: str = "auto"  # "none" | "always" (every item with supports) | "auto": items whose supports' masks,
    #   taken to mask_size and back, keep a pooled Dice below ``min_ceiling`` (thin structures: vessels,
    #   membranes) take this path alone; the other items with supports blend it in (coarse-to-fine)
    min_ceiling: float = 0.85
    blend: float = 0.5  # auto, items not thin: probability = (1 - blend) x the model's + blend x the propagation
    blend_size: int = 128  # ... run with the longer side capped at this size
    max_size: int = 1024  # longer side of the working image (the image's own size when smaller; aspect kept)
    patch: int = 2  # pixels per patch side at the working size
    features: str = "multiscale"
    max_support_patches: int | None = 16384  # class-stratified sample of the support patches voted over
    nprobe: int | None = 8  # faiss inverted file over the support patches (len // 256 lists); None = exact
    classifier: str = "forest"  # of the thin-structure path: "forest" (random forest on a multi-scale filter
    #   bank, fitted to the supports' pixels) | "vote" (the label propagation at 2 px patches); the blend votes
    forest_samples: int = 10000  # support pixels the forest is fitted to (drawn uniformly over the supports)
    forest_trees: int = 20
    forest_depth: int = 12
    forest_sigmas: tuple[float, float] = (1.0, 16.0)  # smallest and largest filter scale, in working pixels
    forest_num_sigma: int = 5

    def validate(self) -> None:
        if self.mode not in ("none", "auto", "always"):
            raise ValueError(f"fine.mode must be 'none', 'auto' or 'always', not {self.mode!r}")
        if not 0 <= self.min_ceiling <= 1:
            raise ValueError(f"fine.min_ceiling must be in [0, 1], not {self.min_ceiling}")
        if self.patch < 1 or self.max_size < 8 * self.patch:
            raise ValueError(f"fine.patch must be >= 1 and fine.max_size >= 8 patches, not {self.patch} / {self.max_size}")
        if not 0 <= self.blend <= 1 or self.blend_size < 8 * self.patch:
            raise ValueError(f"fine.blend must be in [0, 1] and fine.blend_size >= 8 patches, not {self.blend} / {self.blend_size}")
        _check_features("fine", self.features, self.max_support_patches)
        if self.nprobe is not None and self.nprobe < 1:
            raise ValueError(f"fine.nprobe must be a positive number or null, not {self.nprobe}")
        if self.classifier not in ("forest", "vote"):
            raise ValueError(f"fine.classifier must be 'forest' or 'vote', not {self.classifier!r}")
        lo, hi = self.forest_sigmas
        if min(self.forest_samples, self.forest_trees, self.forest_depth, self.forest_num_sigma) < 1 or not 0 < lo <= hi:
            raise ValueError("fine.forest_samples, forest_trees, forest_depth and forest_num_sigma must be >= 1 and "
                             f"fine.forest_sigmas (smallest, largest) with 0 < smallest <= largest, not {self.forest_sigmas}")


@dataclass
class PostprocessConfig:
    """Post-processing of the binary mask decided by the supports' masks (segicl/postprocess.py)."""

    mode: str = "auto"  # "none" | "auto": solid supports (every mask one piece: >= min_largest of it in its
    #   largest component, and no holes: filling adds <= max_holes) -> the largest component (and those at least
    #   solid_min_fragment of its size, when below 1) kept, holes filled;
    #   rings (one piece with a hole) -> fragments under min_fragment x the largest component dropped
    min_largest: float = 0.95
    max_holes: float = 0.01
    min_fragment: float = 0.2
    solid_min_fragment: float = 1.0  # 1.0: a solid structure keeps its largest component alone (0.5 won on val,
    #   lost on the in-domain test split: segicl/postprocess.py)

    def validate(self) -> None:
        if self.mode not in ("none", "auto"):
            raise ValueError(f"postprocess.mode must be 'none' or 'auto', not {self.mode!r}")
        if not (0 < self.min_largest <= 1 and self.max_holes >= 0 and 0 <= self.min_fragment <= 1
                and 0 <= self.solid_min_fragment <= 1):
            raise ValueError(f"postprocess.min_largest, min_fragment and solid_min_fragment must be in (0, 1] and "
                             f"max_holes >= 0, not {self.min_largest} / {self.min_fragment} / {self.solid_min_fragment} / "
                             f"{self.max_holes}")


@dataclass
class CalibrationConfig:
    """The path chosen per task by the task's own labelled examples, leave-one-out (segicl/calibrate.py)."""

    mode: str = "none"  # "none" | "auto": each candidate segments up to `examples` labelled examples of the
    #   task from the others; the best mean Dice wins, the default path unless another beats it by `margin`
    examples: int = 6
    margin: float = 0.02
    candidates: tuple[str, ...] = ("default", "no_blend", "zero_shot")

    def validate(self) -> None:
        from segicl.calibrate import CANDIDATES

        if self.mode not in ("none", "auto"):
            raise ValueError(f"calibration.mode must be 'none' or 'auto', not {self.mode!r}")
        if self.examples < 2 or not 0 <= self.margin < 1:
            raise ValueError(f"calibration.examples must be >= 2 and margin in [0, 1), not {self.examples} / {self.margin}")
        bad = [c for c in self.candidates if c not in CANDIDATES]
        if bad or "default" not in self.candidates:
            raise ValueError(f"calibration.candidates must include 'default' and come from {sorted(CANDIDATES)}, not {bad}")


@dataclass
class SegICLConfig:
    name: str = "tiny"
    image_size: int = 64
    mask_size: int = 64
    k_max: int = 5
    threshold: float = 0.5
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    condition: ConditionConfig = field(default_factory=ConditionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    matching: MatchingConfig = field(default_factory=MatchingConfig)
    fine: FineConfig = field(default_factory=FineConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    # ------------------------------------------------------------------ derived
    @property
    def num_condition_tokens(self) -> int:
        return (self.mask_size // self.condition.patch_size) ** 2

    def validate(self) -> SegICLConfig:
        if self.mask_size % self.condition.patch_size:
            raise ValueError(f"mask_size {self.mask_size} is not a multiple of condition.patch_size {self.condition.patch_size}")
        if self.image_size % self.vision.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of vision.patch_size {self.vision.patch_size}")
        grid = self.image_size // self.vision.patch_size
        if grid % self.vision.pool_to:
            raise ValueError(f"vision patch grid {grid} is not divisible by vision.pool_to {self.vision.pool_to}")
        if self.lm.slot_init not in ("learned", "query"):
            raise ValueError(f"lm.slot_init must be 'learned' or 'query', not {self.lm.slot_init!r}")
        if self.lm.support_prior not in ("none", "attention", "propagation"):
            raise ValueError(f"lm.support_prior must be 'none', 'attention' or 'propagation', not {self.lm.support_prior!r}")
        if self.lm.support_tokens not in ("interleaved", "fused", "dense"):
            raise ValueError(f"lm.support_tokens must be 'interleaved', 'fused' or 'dense', not {self.lm.support_tokens!r}")
        dense = self.lm.support_tokens == "dense"
        if self.lm.dense_condition not in ("tokens", "mask"):
            raise ValueError(f"lm.dense_condition must be 'tokens' or 'mask', not {self.lm.dense_condition!r}")
        if (self.lm.support_prior == "propagation" and not dense) or (dense and self.lm.support_prior == "attention"):
            raise ValueError("lm.support_prior 'propagation' goes with support_tokens 'dense', 'attention' without it")
        if dense and self.image_size // self.vision.patch_size != self.mask_size // self.condition.patch_size:
            raise ValueError(f"lm.support_tokens 'dense' needs one vision patch per condition cell: image_size / "
                             f"vision.patch_size = {self.image_size // self.vision.patch_size}, mask_size / "
                             f"condition.patch_size = {self.mask_size // self.condition.patch_size}")
        self.matching.validate(self.image_size, active=self.matching.mode == "route")
        self.fine.validate()
        self.postprocess.validate()
        self.calibration.validate()
        if self.decoder.space not in ("pixel", "latent"):
            raise ValueError(f"decoder.space must be 'pixel' or 'latent', not {self.decoder.space!r}")
        if self.scheduler.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"unknown scheduler.prediction_type {self.scheduler.prediction_type!r}")
        if self.scheduler.sampler not in ("ddim", "dpm"):
            raise ValueError(f"scheduler.sampler must be 'ddim' or 'dpm', not {self.scheduler.sampler!r}")
        if self.decoder.space == "pixel" and self.mask_size % self.decoder.unshuffle:
            raise ValueError("mask_size must be a multiple of decoder.unshuffle")
        if self.decoder.hint_size is not None and self.decoder.hint_size < 1:
            raise ValueError(f"decoder.hint_size must be a positive size or null, not {self.decoder.hint_size}")
        if self.decoder.pretrained and (self.decoder.space != "latent" or self.decoder.cond_map_channels):
            raise ValueError("decoder.pretrained (a Stable Diffusion directory) needs decoder.space 'latent' and "
                             "decoder.cond_map_channels 0 (the SD UNet takes the 4-channel latent only)")
        return self

    @property
    def hint_size(self) -> int:
        """Resolution of the ControlNet hint (decoder.hint_size, or image_size when unset)."""
        return self.decoder.hint_size or self.image_size

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegICLConfig:
        d = copy.deepcopy(dict(d))
        parts = {"vision": VisionConfig, "lm": LMConfig, "condition": ConditionConfig, "decoder": DecoderConfig,
                 "scheduler": SchedulerConfig, "matching": MatchingConfig,
                 "fine": FineConfig, "postprocess": PostprocessConfig,
                 "calibration": CalibrationConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SegICL config keys {sorted(unknown)}")
        for key, value in d.items():
            if key in parts:
                sub = parts[key]
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - sub_known
                if bad:
                    raise ValueError(f"unknown keys {sorted(bad)} in SegICL config section {key!r}")
                value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
                kwargs[key] = sub(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs).validate()

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SegICLConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no SegICL config.json here") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def preset_names() -> list[str]:
    names = set()
    for d in PRESET_DIRS:
        if d.is_dir():
            names |= {p.stem for p in d.glob("*.json")}
    return sorted(names)


def merge_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied; a section given as a dict (``{"lm": {"pretrained": "x"}}``)
    changes only the fields it names, everything else keeps the base value."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_preset(name: str, **overrides: Any) -> SegICLConfig:
    """The preset ``name`` (configs/model/<name>.json) with ``overrides`` merged in: top-level fields
    are replaced, section dicts are merged field by field (see :func:`merge_overrides`)."""
    for d in PRESET_DIRS:
        path = d / f"{name}.json"
        if path.is_file():
            cfg = SegICLConfig.load(path)
            if overrides:
                cfg = SegICLConfig.from_dict(merge_overrides(cfg.to_dict(), overrides))
            return cfg
    raise ValueError(f"unknown model preset {name!r}; available: {preset_names()}")
