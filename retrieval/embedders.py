"""Image embedders for the support store.

Every embedder maps a list of PIL images to an ``(n, dim)`` float32 array of L2-normalised rows,
so that inner product = cosine similarity. Each has a ``name``, a ``dim`` and an ``id`` string
that changes whenever its output would change (algorithm version, weights hash); the store
records the id and refuses queries embedded by another one.

Specs understood by :func:`get_embedder`:

``pixel`` / ``pixel:<size>``
    Cheap baseline, no weights: a ``size`` x ``size`` grayscale thumbnail (standardised, so cosine
    is the thumbnails' correlation) + a grayscale intensity histogram + per-channel colour
    histograms, each block normalised and weighted (dim 336 at size 16).
``hog`` / ``hog:<size>``
    A classic descriptor, no weights: histograms of oriented gradients (scikit-image ``hog``, 9
    orientations, 16 px cells, 2 x 2 blocks) of the ``size`` x ``size`` grayscale image (default 128)
    + a rotation-invariant uniform local-binary-pattern texture histogram (``local_binary_pattern``,
    P = 8, R = 1) + the ``pixel`` embedder's intensity and colour histograms, each block normalised
    and weighted: shape and texture rather than raw intensities.
``<spec>+<spec>[+...]`` (e.g. ``pixel+hog``)
    The parts' unit vectors concatenated, each weighted equally (cosine = the mean of the parts'
    cosines): layout from one, shape and texture from the other.
``openclip:<dir>`` / ``openclip:<model-name>@<checkpoint file>``
    Any open_clip model from local files (``pretrained=None`` + ``load_state_dict``). A directory
    holds ``open_clip_config.json`` (``{"model_cfg": {...}, "preprocess_cfg": {...}}``, the hub
    layout) and one weight file (``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``,
    ``model.safetensors`` or ``pytorch_model.bin``). Pooled, projected image features.
``segicl`` / ``segicl:<checkpoint dir>``
    The SegICL pipeline's own vision tower (pooled), from ``segicl.pipeline``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

DEFAULT_EMBEDDER = "pixel"
"""Embedder used when none is given: ``pixel``, chosen by ``segicl benchmark embedders`` on the val split
(docs/retrieval.md): ``hog`` has a higher mean Dice but loses 0.16 on ACDC; the model's own tower loses."""

OPENCLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


class EmbedderError(ValueError):
    """An embedder spec cannot be resolved or its files are missing or invalid."""


@runtime_checkable
class Embedder(Protocol):
    """What the store needs from an image embedder."""

    name: str  # family, e.g. "pixel", "openclip", "segicl"
    id: str  # changes whenever the output would change (version, weights hash)
    dim: int
    spec: str  # the spec string that recreates it with get_embedder

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(n, dim) float32, rows L2-normalised."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------- pixel
class PixelEmbedder:
    """Downsampled-pixel + intensity/colour-histogram vector; deterministic, no weights."""

    name = "pixel"
    VERSION = 1
    GRAY_BINS = 32
    COLOUR_BINS = 16
    # Block weights (each block is L2-normalised first): layout dominates, histograms break ties
    # and separate modalities (grayscale vs colour images).
    W_THUMB, W_GRAY, W_COLOUR = 1.0, 0.5, 0.5

    def __init__(self, size: int = 16):
        if not 4 <= int(size) <= 128:
            raise EmbedderError(f"pixel embedder: thumbnail size must be in 4..128, got {size}")
        self.size = int(size)
        self.dim = self.size * self.size + self.GRAY_BINS + 3 * self.COLOUR_BINS
        self.spec = "pixel" if self.size == 16 else f"pixel:{self.size}"
        self.id = f"pixel-v{self.VERSION}-s{self.size}"

    def _one(self, image: Image.Image) -> np.ndarray:
        rgb = image.convert("RGB")
        gray = rgb.convert("L")
        thumb = np.asarray(gray.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.float32).ravel()
        thumb = thumb - thumb.mean()
        std = thumb.std()
        thumb = thumb / std if std > 1e-6 else np.zeros_like(thumb)
        ghist, chist = _histograms(rgb, self.GRAY_BINS, self.COLOUR_BINS)
        return _weighted_blocks([(thumb, self.W_THUMB), (ghist, self.W_GRAY), (chist, self.W_COLOUR)])

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(np.stack([self._one(im) for im in images]))


def _histograms(rgb: Image.Image, gray_bins: int, colour_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Hellinger-mapped grayscale and per-channel colour histograms of a 64 x 64 copy."""
    small = rgb.resize((64, 64), Image.Resampling.BILINEAR)
    arr = np.asarray(small, dtype=np.float32) / 255.0  # (64, 64, 3)
    g = np.asarray(small.convert("L"), dtype=np.float32).ravel() / 255.0
    ghist = np.sqrt(np.histogram(g, bins=gray_bins, range=(0.0, 1.0))[0] / g.size)
    chist = np.concatenate([
        np.sqrt(np.histogram(arr[..., c], bins=colour_bins, range=(0.0, 1.0))[0] / g.size) for c in range(3)
    ])
    return ghist, chist


def _weighted_blocks(blocks: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """Each block L2-normalised, times its weight, concatenated."""
    return np.concatenate([w * b / max(float(np.linalg.norm(b)), 1e-12) for b, w in blocks]).astype(np.float32)


# --------------------------------------------------------------------------------------- hog
class HOGEmbedder:
    """HOG + LBP texture + intensity/colour histograms (scikit-image); deterministic, no weights."""

    name = "hog"
    VERSION = 1
    CELL = 16
    LBP_POINTS = 8
    # Block weights (each block L2-normalised first): gradient layout first, texture and colour next.
    W_HOG, W_LBP, W_GRAY, W_COLOUR = 1.0, 0.5, 0.25, 0.25

    def __init__(self, size: int = 128):
        if not 32 <= int(size) <= 512 or int(size) % self.CELL:
            raise EmbedderError(f"hog embedder: image size must be a multiple of {self.CELL} in 32..512, got {size}")
        try:
            from skimage import feature
        except ImportError as exc:  # scikit-image is a dependency; say so if it is missing
            raise EmbedderError(f"hog embedder needs scikit-image ({exc})") from exc
        self._feature = feature
        self.size = int(size)
        cells = self.size // self.CELL
        n_lbp = self.LBP_POINTS + 2  # uniform rotation-invariant codes 0..P, and P + 1 for the rest
        self.dim = (cells - 1) ** 2 * 4 * 9 + n_lbp + PixelEmbedder.GRAY_BINS + 3 * PixelEmbedder.COLOUR_BINS
        self.spec = "hog" if self.size == 128 else f"hog:{self.size}"
        self.id = f"hog-v{self.VERSION}-s{self.size}"

    def _one(self, image: Image.Image) -> np.ndarray:
        rgb = image.convert("RGB")
        gray = np.asarray(rgb.convert("L").resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        hog = self._feature.hog(gray, orientations=9, pixels_per_cell=(self.CELL, self.CELL), cells_per_block=(2, 2),
                                block_norm="L2-Hys", feature_vector=True)
        lbp = self._feature.local_binary_pattern((gray * 255).astype(np.uint8), self.LBP_POINTS, 1, method="uniform")
        lhist = np.sqrt(np.bincount(lbp.astype(np.int64).ravel(), minlength=self.LBP_POINTS + 2) / lbp.size)
        ghist, chist = _histograms(rgb, PixelEmbedder.GRAY_BINS, PixelEmbedder.COLOUR_BINS)
        return _weighted_blocks([(hog.astype(np.float32), self.W_HOG), (lhist, self.W_LBP),
                                 (ghist, self.W_GRAY), (chist, self.W_COLOUR)])

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        return l2_normalise(np.stack([self._one(im) for im in images]))


# --------------------------------------------------------------------------------------- concatenation
class ConcatEmbedder:
    """Several embedders' unit vectors side by side, each scaled by 1 / sqrt(n): the cosine of two
    concatenations is the mean of the parts' cosines."""

    name = "concat"

    def __init__(self, parts: Sequence[Embedder]):
        if len(parts) < 2:
            raise EmbedderError("a concatenated embedder needs at least two parts")
        self.parts = list(parts)
        self.dim = sum(int(p.dim) for p in self.parts)
        self.spec = "+".join(getattr(p, "spec", p.name) for p in self.parts)
        self.id = "+".join(p.id for p in self.parts)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        scale = np.float32(1.0 / np.sqrt(len(self.parts)))
        return np.concatenate([l2_normalise(p.embed(images)) * scale for p in self.parts], axis=1)


# --------------------------------------------------------------------------------------- open_clip
def _read_state(path: Path) -> dict:
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - report any reader failure with the file name
        raise EmbedderError(f"{path}: cannot read weights ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EmbedderError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def hash_state(state: dict, prefix: str = "") -> str:
    """sha256 over the names, shapes, dtypes and bytes of the tensors under ``prefix`` (sorted)."""
    h = hashlib.sha256()
    for key in sorted(state):
        if not key.startswith(prefix):
            continue
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


class OpenCLIPEmbedder:
    """Pooled, projected image features of an open_clip model loaded from local files."""

    name = "openclip"

    def __init__(self, source: str, device: str | None = None):
        import open_clip
        import torch

        self.spec = f"openclip:{source}"
        model_cfg, preprocess_cfg, weights, model_name = self._resolve(source)
        try:
            if model_cfg is not None:
                model = self._model_from_cfg(model_cfg)
            else:
                model = open_clip.create_model(model_name, pretrained=None)
        except Exception as exc:  # noqa: BLE001
            raise EmbedderError(f"{source}: cannot build the open_clip model ({exc})") from exc
        state = _read_state(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing_visual = [k for k in missing if k.startswith("visual.")]
        if missing_visual:
            raise EmbedderError(f"{weights}: weights lack {len(missing_visual)} vision-tower tensors, e.g. {missing_visual[:3]}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        image_size = (preprocess_cfg or {}).get("size") or getattr(model.visual, "image_size", 224)
        if isinstance(image_size, (list, tuple)):
            image_size = image_size[0]
        mean = (preprocess_cfg or {}).get("mean") or getattr(model.visual, "image_mean", None)
        std = (preprocess_cfg or {}).get("std") or getattr(model.visual, "image_std", None)
        self.preprocess = open_clip.image_transform(int(image_size), is_train=False, mean=mean, std=std)
        with torch.no_grad():
            probe = self.model.encode_image(torch.zeros(1, 3, int(image_size), int(image_size), device=self.device))
        self.dim = int(probe.shape[-1])
        self.id = f"openclip-{hash_state(self.model.state_dict(), 'visual.')[:16]}"

    @staticmethod
    def _resolve(source: str):
        if "@" in source and not Path(source).exists():
            model_name, _, ckpt = source.partition("@")
            ckpt_path = Path(ckpt)
            if not ckpt_path.is_file():
                raise EmbedderError(f"{ckpt_path}: open_clip checkpoint file not found (spec openclip:{source})")
            return None, None, ckpt_path, model_name
        root = Path(source)
        if not root.is_dir():
            raise EmbedderError(f"{root}: open_clip model directory not found (spec openclip:{source}; "
                                "use openclip:<dir> or openclip:<model-name>@<checkpoint file>)")
        cfg_file = root / "open_clip_config.json"
        if not cfg_file.is_file():
            raise EmbedderError(f"{cfg_file}: missing (an open_clip model directory needs open_clip_config.json)")
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise EmbedderError(f"{cfg_file}: invalid JSON ({exc})") from exc
        model_cfg = cfg.get("model_cfg", cfg)
        if "vision_cfg" not in model_cfg:
            raise EmbedderError(f"{cfg_file}: no model_cfg.vision_cfg")
        weights = next((root / f for f in OPENCLIP_WEIGHT_FILES if (root / f).is_file()), None)
        if weights is None:
            raise EmbedderError(f"{root}: no weight file (expected one of {', '.join(OPENCLIP_WEIGHT_FILES)})")
        return model_cfg, cfg.get("preprocess_cfg"), weights, None

    @staticmethod
    def _model_from_cfg(model_cfg: dict):
        from open_clip.model import CLIP, CustomTextCLIP

        cfg = dict(model_cfg)
        cls = CustomTextCLIP if "hf_model_name" in cfg.get("text_cfg", {}) or cfg.pop("custom_text", False) else CLIP
        return cls(**cfg)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        if not len(images):
            return np.zeros((0, self.dim), np.float32)
        batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        with torch.no_grad():
            feats = self.model.encode_image(batch).float()
        return l2_normalise(feats.cpu().numpy())


# --------------------------------------------------------------------------------------- segicl
class SegICLEmbedder:
    """The SegICL pipeline's own vision tower, pooled (``SegICLPipeline.embed_images``)."""

    name = "segicl"

    def __init__(self, checkpoint: str | None = None, pipeline=None):
        if pipeline is None:
            try:
                from segicl.pipeline import SegICLPipeline, default_checkpoint
            except ImportError as exc:
                raise EmbedderError(f"segicl embedder: segicl.pipeline is not available ({exc})") from exc
            path = checkpoint or default_checkpoint()
            try:
                pipeline = SegICLPipeline.from_pretrained(path)
            except FileNotFoundError as exc:
                raise EmbedderError(f"{path}: SegICL checkpoint not found ({exc})") from exc
        self.pipeline = pipeline
        self.spec = f"segicl:{checkpoint}" if checkpoint else "segicl"
        self.id = str(pipeline.embedder_id)  # "segicl-vision:<hash of the vision tower's weights>"
        self.dim = int(self.embed([Image.new("RGB", (32, 32))]).shape[1])

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, getattr(self, "dim", 0)), np.float32)
        return l2_normalise(self.pipeline.embed_images(list(images)))


# --------------------------------------------------------------------------------------- factory
def get_embedder(spec: str | Embedder | None = None) -> Embedder:
    """An embedder from a spec string (see the module docstring); an Embedder is returned as is."""
    if spec is None:
        spec = DEFAULT_EMBEDDER
    if not isinstance(spec, str):
        for attr in ("id", "dim", "embed", "name"):
            if not hasattr(spec, attr):
                raise EmbedderError(f"embedder object {spec!r} lacks {attr!r}")
        return spec
    if "+" in spec:
        return ConcatEmbedder([get_embedder(part) for part in spec.split("+")])
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "pixel":
        try:
            return PixelEmbedder(int(arg) if arg else 16)
        except ValueError as exc:
            raise EmbedderError(f"pixel embedder: bad spec {spec!r} ({exc})") from exc
    if kind == "hog":
        try:
            return HOGEmbedder(int(arg) if arg else 128)
        except ValueError as exc:
            raise EmbedderError(f"hog embedder: bad spec {spec!r} ({exc})") from exc
    if kind in ("openclip", "open_clip"):
        if not arg:
            raise EmbedderError("openclip embedder needs a source: openclip:<dir> or openclip:<model-name>@<checkpoint file>")
        return OpenCLIPEmbedder(arg)
    if kind == "segicl":
        return SegICLEmbedder(arg or None)
    raise EmbedderError(f"unknown embedder {spec!r}; use pixel[:size], hog[:size], a+b, openclip:<dir|name@file> or segicl[:<checkpoint dir>]")
