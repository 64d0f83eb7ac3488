"""Build, save and load VLSM baselines: ``build_vlsm(model, mode, config)`` and :class:`VLSMModel`.

A plain dict registry of builders (segment-anything style)::

    clipseg           transformers CLIPSegForImageSegmentation (local checkpoint dir or tiny arch)
    biomedclipseg     BiomedCLIP encoders (open_clip checkpoint dir or tiny arch) + random CLIPSeg decoder
    biomedclipseg_d   the same with the decoder taken from a CLIPSeg checkpoint
    cris              CRIS: open_clip CLIP ResNet + text transformer, FPN, VL decoder, projector

Saved format (``save_pretrained``, written atomically: a temporary sibling directory renamed into
place): ``config.json`` (model, mode and the concrete architecture, so no original checkpoint is
needed to reload), ``model.safetensors`` (all weights) and ``tokenizer/``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from segicl.io import atomic_directory
from segicl.vlsm.base import MODES, VLSMNet, check_mode
from segicl.vlsm.tokenizers import load_tokenizer, tokenize

FORMAT = "segicl-vlsm"
FORMAT_VERSION = 1
# Keys pointing at original checkpoints: dropped from a saved config (the weights are in the safetensors).
_SOURCE_KEYS = ("pretrained", "decoder_from", "checkpoint", "clip_checkpoint")


def _builders() -> dict[str, Callable[[dict], tuple[VLSMNet, object, dict]]]:
    from segicl.vlsm.biomedclipseg import build_biomedclipseg, build_biomedclipseg_d
    from segicl.vlsm.clipseg import build_clipseg
    from segicl.vlsm.cris import build_cris

    return {
        "clipseg": build_clipseg,
        "biomedclipseg": build_biomedclipseg,
        "biomedclipseg_d": build_biomedclipseg_d,
        "cris": build_cris,
    }


MODELS = ("clipseg", "biomedclipseg", "biomedclipseg_d", "cris")


def load_config(config: dict | str | Path | None) -> dict:
    """A config dict from a dict, a ``.yaml``/``.yml``/``.json`` file, or None (empty)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return json.loads(json.dumps(config))  # deep copy, and proof that it is JSON-serialisable
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config must be a mapping")
    return data


def build_vlsm(model: str, mode: str, config: dict | str | Path | None = None) -> VLSMModel:
    """Build a VLSM baseline in a tuning mode.

    Args:
        model: one of :data:`MODELS`.
        mode: one of :data:`segicl.vlsm.base.MODES` (CRIS takes zero_shot, e2e, decoder, coop, cocoop).
        config: dict or YAML/JSON path. Keys: ``pretrained`` (local checkpoint) or ``arch`` (random
            init), ``image_size``, ``text_max_length``, ``prompt``, ``adapter``, ``upsampler``,
            ``seed``; a ``models: {name: {...}}`` block is merged in for ``model`` (one file can hold
            all four tiny architectures). Checkpoint paths (``pretrained``, ``decoder_from``,
            ``checkpoint``, ``clip_checkpoint``) expand ``~`` and ``$VARS``.

    Returns:
        The :class:`VLSMModel` with exactly the mode's parameters trainable.
    """
    builders = _builders()
    if model not in builders:
        raise ValueError(f"unknown VLSM {model!r}; choose from {MODELS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    cfg = load_config(config)
    if cfg.get("model") not in (None, model):
        raise ValueError(f"config is for model {cfg['model']!r}, not {model!r}")
    per_model = (cfg.pop("models", None) or {}).get(model, {})
    cfg = {**cfg, **per_model}
    for key in _SOURCE_KEYS:
        if cfg.get(key):
            value = os.path.expanduser(os.path.expandvars(str(cfg[key])))
            if "$" in value:
                raise ValueError(f"config key {key!r}: environment variable in {cfg[key]!r} is not set")
            cfg[key] = value
    seed = cfg.get("seed")
    # Seed the random initialisation without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(int(seed))
        net, tokenizer, arch = builders[model](cfg)
        check_mode(mode, net.has_vit)
        net.setup_mode(mode, cfg, tokenizer)
    saved = {k: v for k, v in cfg.items() if k not in _SOURCE_KEYS}
    saved["arch"] = arch
    return VLSMModel(net, tokenizer, model, mode, saved)


class VLSMModel(nn.Module):
    """A VLSM network with its tokenizer and config: train, predict, save, load.

    Attributes:
        net: the :class:`~segicl.vlsm.base.VLSMNet`.
        tokenizer: a transformers tokenizer.
        model_name / mode / config: as built.
    """

    def __init__(self, net: VLSMNet, tokenizer, model_name: str, mode: str, config: dict):
        super().__init__()
        self.net = net
        self.tokenizer = tokenizer
        self.model_name, self.mode, self.config = model_name, mode, config

    # --------------------------------------------------------------------------------- shapes
    @property
    def image_size(self) -> int:
        return int(self.config.get("image_size", 352))

    @property
    def text_length(self) -> int:
        """Tokens per text given to the tokenizer (the prompt learner's contexts come on top)."""
        limit = self.net.text_tower.max_length
        return min(int(self.config.get("text_max_length", limit)), limit) - self.net.n_text_context

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Texts -> ``input_ids`` / ``attention_mask`` (B, text_length)."""
        return tokenize(self.tokenizer, list(texts), self.text_length)

    # --------------------------------------------------------------------------------- compute
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [-1, 1] + (B, L) tokens -> (B, 1, S, S) logits."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (B, 3, S, S), got {tuple(pixel_values.shape)}")
        if input_ids.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} texts for {pixel_values.shape[0]} images")
        return self.net(pixel_values, input_ids, attention_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    @torch.no_grad()
    def predict(self, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int = 8) -> list[np.ndarray]:
        """Probability maps at each image's original size.

        Args:
            images: PIL images (RGB or L, any size).
            texts: one prompt per image.
            batch_size: images per forward.

        Returns:
            One float32 (H, W) array in [0, 1] per image.
        """
        from segicl.data.transforms import image_to_tensor, resize_prob

        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: list[np.ndarray] = []
        try:
            for i in range(0, len(images), batch_size):
                chunk = images[i : i + batch_size]
                px = torch.stack([image_to_tensor(im, self.image_size) for im in chunk]).to(device)
                tok = {k: v.to(device) for k, v in self.tokenize(texts[i : i + batch_size]).items()}
                prob = torch.sigmoid(self(px, tok["input_ids"], tok["attention_mask"]).float())[:, 0]
                out += [resize_prob(p, (im.height, im.width)).clip(0.0, 1.0) for p, im in zip(prob, chunk)]
        finally:
            self.train(was_training)
        return out

    # --------------------------------------------------------------------------------- persistence
    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer/`` to ``path`` atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        with atomic_directory(path) as tmp:
            meta = {"format": FORMAT, "version": FORMAT_VERSION, "model": self.model_name, "mode": self.mode,
                    "config": self.config}
            (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
            state = {k: v.detach().cpu().contiguous().clone() for k, v in self.net.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> VLSMModel:
        """Load a directory written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (not a saved VLSM)")
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{cfg_path}: format {meta.get('format')!r} is not {FORMAT!r}")
        builders = _builders()
        model_name, mode, cfg = meta["model"], meta["mode"], dict(meta["config"])
        if model_name not in builders:
            raise ValueError(f"{cfg_path}: unknown model {model_name!r}")
        net, _, arch = builders[model_name]({**cfg, "pretrained": None})
        tokenizer = load_tokenizer(path / "tokenizer")
        net.setup_mode(mode, cfg, tokenizer)
        state = load_file(str(path / "model.safetensors"), device=str(map_location))
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
        model = cls(net, tokenizer, model_name, mode, cfg)
        return model.to(map_location).eval()


def load_vlsm(path: str | Path, map_location: str | torch.device = "cpu") -> VLSMModel:
    """Load a saved VLSM (the eval suite's entry point): ``load_vlsm(dir).predict(images, texts)``."""
    return VLSMModel.from_pretrained(path, map_location)
