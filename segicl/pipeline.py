"""SegICLPipeline: instruction + support pairs + query images -> masks, probabilities, uncertainty.

    pipe = SegICLPipeline.from_pretrained("segicl/checkpoints/tiny")   # or default_checkpoint()
    out = pipe(images=[query], text=["Segment the breast lesion in this ultrasound image."],
               supports=[[(img_1, mask_1), (img_2, mask_2)]], num_inference_steps=10, num_samples=4,
               generator=torch.Generator().manual_seed(0))
    out.masks[0]          # bool (H, W) at the query's original resolution
    out.probabilities[0]  # float32 (H, W): mean of the samples
    out.uncertainty[0]    # float32 (H, W): per-pixel std of the samples (0 with one sample)
    out.paths[0]          # "encoder", "route", "blend" or "fine": which path made it

With supports whose masks a ``mask_size`` grid cannot hold (thin structures; ``fine.mode = "auto"``),
an item is segmented at its own resolution by segicl/native.py instead of the coarse model; other
items with supports average the model's probability with that propagation at ``fine.blend_size``.

A saved pipeline is a directory: ``config.json`` (:class:`SegICLConfig`), ``decoder_structure.json``
(the diffusers configs of UNet / ControlNet / VAE), ``scheduler_config.json`` and one safetensors file
per part (``encoder``, ``condition_encoder``, ``decoder`` and, when there is one, ``route_decoder``),
plus ``manifest.json`` with sha256 of every file. It is written to a temporary sibling directory and
renamed into place, so an interrupted save never leaves a half-written checkpoint; loading verifies
the checksums and loads only safetensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from segicl import PACKAGE_DIR
from segicl.condition_encoder import ConditionEncoder
from segicl.config import SegICLConfig, load_preset, merge_overrides
from segicl.data.transforms import image_to_tensor, mask_to_tensor, resize_prob
from segicl.decoder import MaskDecoder, build_scheduler
from segicl.encoder import MultimodalEncoder
from segicl.io import atomic_directory, sha256_file
from segicl.matching import match_supports
from segicl.native import fine_propagation, native_probability, use_fine
from segicl.postprocess import Decision, apply, decide

DEFAULT_CHECKPOINT = PACKAGE_DIR / "checkpoints" / "tiny"
PARTS = ("encoder", "condition_encoder", "decoder")  # + the optional "route_decoder"


def default_checkpoint() -> Path:
    """The checkpoint that ships inside the package (the default ``--checkpoint`` of every command)."""
    if not (DEFAULT_CHECKPOINT / "config.json").is_file():
        raise FileNotFoundError(f"{DEFAULT_CHECKPOINT}: the shipped checkpoint is missing (pass --checkpoint DIR)")
    return DEFAULT_CHECKPOINT


@dataclass
class SegICLOutput:
    masks: list[np.ndarray]
    probabilities: list[np.ndarray]
    uncertainty: list[np.ndarray]
    # per image, the path that made it: "encoder" (the LM's S), "route" (the label-propagation mask
    # rendered by the decoder), "blend" (the decoder's mask averaged with the propagation at
    # fine.blend_size) or "fine" (the native-resolution path alone, segicl/native.py)
    paths: list[str] = field(default_factory=list)
    # per image, the post-processing the supports decided and applied to the mask (segicl/postprocess.py);
    # the probabilities are not post-processed
    postprocess: list[dict[str, bool]] = field(default_factory=list)


def _as_image(x: Any, what: str) -> Image.Image:
    if isinstance(x, Image.Image):
        return x
    if isinstance(x, (str, Path)):
        from segicl.data.dataset import open_image

        return open_image(Path(x))
    if isinstance(x, np.ndarray):
        if x.ndim == 2 or (x.ndim == 3 and x.shape[-1] in (1, 3)):
            arr = x if x.dtype == np.uint8 else np.clip(x, 0, 255).astype(np.uint8)
            return Image.fromarray(arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr)
    raise TypeError(f"{what}: expected a PIL image, a path or an (H, W[, 3]) array, got {type(x).__name__}")


def _as_mask(x: Any, what: str) -> np.ndarray:
    if isinstance(x, Image.Image):
        x = np.asarray(x)
    if isinstance(x, (str, Path)):
        x = np.asarray(Image.open(x))
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[..., 0]
    if x.ndim != 2:
        raise ValueError(f"{what}: a mask must be 2-D, got shape {x.shape}")
    return x > 0


class SegICLPipeline:
    """The full model; a plain container (not an nn.Module) around the three trainable parts.

    ``route_decoder`` (optional): a second decoder for ``matching.mode = "route"``, used for the items
    that have supports. Stage 3 adapts ``decoder`` to the LM's predicted tokens S, which costs it some
    fidelity to crisp condition tokens; the route renders the condition tokens of a mask, which the
    stage-1 decoder does best, so stage 3 can keep a frozen copy of it here (``model.route_decoder``).
    """

    def __init__(self, encoder: MultimodalEncoder, condition_encoder: ConditionEncoder, decoder: MaskDecoder,
                 scheduler: Any = None, config: SegICLConfig | None = None, route_decoder: MaskDecoder | None = None):
        self.config = config or encoder.cfg
        self.encoder = encoder
        self.condition_encoder = condition_encoder
        self.decoder = decoder
        self.route_decoder = route_decoder
        self.scheduler = scheduler if scheduler is not None else build_scheduler(self.config)
        self.device = torch.device("cpu")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: SegICLConfig, seed: int = 0) -> SegICLPipeline:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            condition_encoder = ConditionEncoder.from_config(cfg)
            decoder = MaskDecoder.from_config(cfg)
            encoder = MultimodalEncoder(cfg)
        pipe = cls(encoder, condition_encoder, decoder, build_scheduler(cfg), cfg)
        pipe.eval()
        return pipe

    @classmethod
    def from_preset(cls, name: str = "tiny", seed: int = 0, **overrides: Any) -> SegICLPipeline:
        """Random weights of a preset (configs/model/<name>.json)."""
        return cls.from_config(load_preset(name, **overrides), seed=seed)

    def modules(self) -> dict[str, torch.nn.Module]:
        parts = {"encoder": self.encoder, "condition_encoder": self.condition_encoder, "decoder": self.decoder}
        if self.route_decoder is not None:
            parts["route_decoder"] = self.route_decoder
        return parts

    def set_matching(self, **fields: Any) -> SegICLPipeline:
        """Change ``config.matching`` fields (e.g. ``mode="route"``), validated like a loaded config."""
        self.config = SegICLConfig.from_dict(merge_overrides(self.config.to_dict(), {"matching": fields}))
        return self

    def set_lm(self, **fields: Any) -> SegICLPipeline:
        """Change inference fields of ``config.lm`` (``dense_condition``), validated like a loaded config."""
        bad = set(fields) - {"dense_condition"}
        if bad:
            raise ValueError(f"set_lm changes lm.dense_condition only (the other fields shape the weights), not {sorted(bad)}")
        self.config = SegICLConfig.from_dict(merge_overrides(self.config.to_dict(), {"lm": fields}))
        return self

    def set_fine(self, **fields: Any) -> SegICLPipeline:
        """Change ``config.fine`` fields (e.g. ``mode="none"``), validated like a loaded config."""
        self.config = SegICLConfig.from_dict(merge_overrides(self.config.to_dict(), {"fine": fields}))
        return self

    def set_calibration(self, **fields: Any) -> SegICLPipeline:
        """Change ``config.calibration`` fields (e.g. ``mode="auto"``), validated like a loaded config."""
        self.config = SegICLConfig.from_dict(merge_overrides(self.config.to_dict(), {"calibration": fields}))
        return self

    def set_postprocess(self, **fields: Any) -> SegICLPipeline:
        """Change ``config.postprocess`` fields (e.g. ``mode="none"``), validated like a loaded config."""
        self.config = SegICLConfig.from_dict(merge_overrides(self.config.to_dict(), {"postprocess": fields}))
        return self

    def to(self, device: str | torch.device) -> SegICLPipeline:
        self.device = torch.device(device)
        for m in self.modules().values():
            m.to(self.device)
        return self

    def eval(self) -> SegICLPipeline:
        for m in self.modules().values():
            m.eval()
        return self

    def num_parameters(self) -> dict[str, int]:
        return {k: sum(p.numel() for p in m.parameters()) for k, m in self.modules().items()}

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the pipeline to ``path`` atomically (temp dir + rename); ``extra`` goes into manifest.json."""
        path = Path(path)
        with atomic_directory(path) as tmp:
            self.config.save(tmp / "config.json")
            (tmp / "decoder_structure.json").write_text(json.dumps(self.decoder.structure(), indent=2, default=list) + "\n")
            self.scheduler.save_config(tmp)
            for name, module in self.modules().items():
                state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
                save_file(state, str(tmp / f"{name}.safetensors"))
            files = sorted(p.name for p in tmp.iterdir())
            manifest = {"format": "segicl-pipeline/1", "files": {f: sha256_file(tmp / f) for f in files},
                        "num_parameters": self.num_parameters(), **(extra or {})}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> SegICLPipeline:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: checkpoint directory not found")
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: missing (not a SegICL checkpoint, or an interrupted save)")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = dict(manifest.get("files", {}))
        except (UnicodeDecodeError, ValueError, AttributeError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise ValueError(f"{manifest_path}: not a valid checkpoint manifest ({exc})") from None
        if verify:
            for name, digest in files.items():
                f = path / name
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: listed in manifest.json but missing")
                if sha256_file(f) != digest:
                    raise ValueError(f"{f}: checksum does not match manifest.json (corrupted or modified file)")
        cfg = SegICLConfig.load(path / "config.json")
        structure = json.loads((path / "decoder_structure.json").read_text())
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_pretrained(path)
        # The architecture is rebuilt from the config (the paper preset needs its local model
        # directories for that), then every weight comes from the checkpoint's safetensors.
        condition_encoder = ConditionEncoder.from_config(cfg)
        decoder = MaskDecoder.from_structure(structure, cfg)
        encoder = MultimodalEncoder(cfg)
        route = MaskDecoder.from_structure(structure, cfg) if (path / "route_decoder.safetensors").is_file() else None
        pipe = cls(encoder, condition_encoder, decoder, scheduler, cfg, route_decoder=route)
        for name, module in pipe.modules().items():
            f = path / f"{name}.safetensors"
            if verify and f.name not in files:
                raise ValueError(f"{f}: not listed in manifest.json (unverified weights are never loaded)")
            try:
                state = load_file(str(f))
            except Exception as e:  # safetensors raises its own error types
                raise ValueError(f"{f}: cannot read safetensors ({e})") from None
            missing, unexpected = module.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{f}: weights do not match the config (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return pipe.to(device).eval()

    # ------------------------------------------------------------------ inference
    def _images_tensor(self, images: Sequence[Any], what: str) -> torch.Tensor:
        s = self.config.image_size
        return torch.stack([image_to_tensor(_as_image(im, f"{what}[{i}]"), s) for i, im in enumerate(images)]).to(self.device)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any], batch_size: int = 64) -> np.ndarray:
        """(n, d) float32 L2-normalised embeddings of the vision tower (the retrieval embedder)."""
        out = []
        for i in range(0, len(images), batch_size):
            x = self._images_tensor(images[i : i + batch_size], "images")
            out.append(self.encoder.embed_images(x).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.vision.embed_dim), np.float32)

    @property
    def embedder_id(self) -> str:
        """Identifies the vision tower's weights: stores built with another tower refuse its queries."""
        h = hashlib.sha256()
        for k, v in sorted(self.encoder.vision.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().float().numpy().tobytes())
        return f"segicl-vision:{h.hexdigest()[:16]}"

    def _support_batch(self, images: torch.Tensor, supports: list[list[tuple[torch.Tensor, torch.Tensor]]]):
        """Per-item support lists -> padded (B, K, 3, S, S) images, (B, K, 1, M, M) masks and k per item;
        (None, None, None) when no item has supports."""
        b, k = images.shape[0], max((len(x) for x in supports), default=0)
        if not k:
            return None, None, None
        s, m = self.config.image_size, self.config.mask_size
        simg = torch.zeros(b, k, 3, s, s, device=self.device)
        smask = torch.zeros(b, k, 1, m, m, device=self.device)
        for i, sup in enumerate(supports):
            for j, (im, mk) in enumerate(sup):
                simg[i, j], smask[i, j] = im, mk
        return simg, smask, [len(x) for x in supports]

    @torch.no_grad()
    def encode_dense(self, images: torch.Tensor, texts: list[str],
                     supports: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        """Dense layout: the encoder's outputs ``{"cond", "mask_logits"[, "prior"]}`` for model-resolution tensors."""
        simg, smask, ks = self._support_batch(images, supports)
        return self.encoder(texts, images, simg, None, ks, support_masks=smask, return_dict=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, texts: list[str], supports: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
        """Model-resolution tensors -> predicted condition tokens S (B, N, d_c)."""
        simg, smask, ks = self._support_batch(images, supports)
        if simg is not None and self.config.matching.mode == "route":
            return self._route(images, texts, simg, smask, ks)
        if self.config.lm.support_tokens == "dense":
            return self.dense_condition(self.encoder(texts, images, simg, None, ks, support_masks=smask, return_dict=True))
        if simg is None:
            return self.encoder(texts, images)
        cond = self.condition_encoder(smask.flatten(0, 1)).view(*smask.shape[:2], *self.decoder.null_cond.shape[1:])
        return self.encoder(texts, images, simg, cond, ks, support_masks=smask)

    def dense_condition(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The dense layout's condition tokens from :meth:`encode_dense`'s outputs: the LM's map S, or
        (``lm.dense_condition = "mask"``) the condition encoder's tokens of the mask head's thresholded mask."""
        if self.config.lm.dense_condition == "mask":
            return self.route_condition(torch.sigmoid(out["mask_logits"]))
        return out["cond"]

    @torch.no_grad()
    def decode(self, images: torch.Tensor, cond: torch.Tensor, ks: Sequence[int], num_inference_steps: int,
               num_samples: int = 1, sampler: str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample masks (b, num_samples, M, M) from condition tokens; with a ``route_decoder`` and condition
        tokens of a mask (the route, or the dense layout's ``dense_condition = "mask"``), the items with
        supports (``ks[i] > 0``) are rendered by the route decoder."""
        sampler = sampler or self.config.scheduler.sampler
        crisp = self.config.matching.mode == "route" or (self.config.lm.support_tokens == "dense"
                                                          and self.config.lm.dense_condition == "mask")
        routed = [i for i, k in enumerate(ks) if k] if self.route_decoder is not None and crisp else []
        if not routed:
            return self.decoder.sample(images, cond, self.scheduler, num_inference_steps, num_samples, sampler, generator)
        rest = [i for i, k in enumerate(ks) if not k]
        out = torch.empty(len(ks), num_samples, self.config.mask_size, self.config.mask_size, device=images.device)
        for idx, dec in ((routed, self.route_decoder), (rest, self.decoder)):
            if idx:
                out[idx] = dec.sample(images[idx], cond[idx], self.scheduler, num_inference_steps, num_samples, sampler,
                                      generator).to(out.dtype)
        return out

    def match(self, images: torch.Tensor, support_images: torch.Tensor, support_masks: torch.Tensor,
              ks: list[int]) -> torch.Tensor:
        """The label-propagation prior (b, 1, M, M) of each query from its supports (segicl/matching.py)."""
        return match_supports(images, support_images, support_masks, ks, self.config.matching, self.config.mask_size)

    def route_condition(self, prior: torch.Tensor) -> torch.Tensor:
        """The route's condition tokens: the condition encoder's tokens of a thresholded
        label-propagation mask (b, 1, M, M) from :meth:`match`."""
        return self.condition_encoder((prior > self.config.threshold).float())

    def _route(self, images: torch.Tensor, texts: list[str], simg: torch.Tensor, smask: torch.Tensor,
               ks: list[int]) -> torch.Tensor:
        """``matching.mode = "route"``: items with supports get :meth:`route_condition`, items without
        supports the LM's S (k = 0)."""
        cond = self.route_condition(self.match(images, simg, smask, ks))
        empty = [i for i, k in enumerate(ks) if not k]
        if empty:
            cond[empty] = self.encoder([texts[i] for i in empty], images[empty]).to(cond.dtype)
        return cond

    @torch.no_grad()
    def __call__(self, images: Sequence[Any], text: str | Sequence[str | None] | None = None,
                 supports: Sequence[Sequence[tuple[Any, Any]]] | None = None, num_inference_steps: int | None = None,
                 num_samples: int | None = None, generator: torch.Generator | None = None, batch_size: int = 8,
                 sampler: str | None = None) -> SegICLOutput:
        """Segment ``images``.

        Args:
            images: query images (PIL, paths or arrays), any size.
            text: one instruction for all, one per image, or None (empty instruction).
            supports: per image, a list of (image, mask) pairs (k may differ per image; k <= K_max).
            num_inference_steps / num_samples / sampler: defaults from the config.
            generator: a CPU ``torch.Generator`` for the initial noise (deterministic under a seed).
        """
        images = list(images)
        n = len(images)
        if isinstance(text, str) or text is None:
            texts = [text or ""] * n
        else:
            texts = [t or "" for t in text]
        if len(texts) != n:
            raise ValueError(f"{len(texts)} texts for {n} images")
        supports = [list(s) for s in supports] if supports is not None else [[] for _ in range(n)]
        if len(supports) != n:
            raise ValueError(f"{len(supports)} support lists for {n} images")
        kmax = self.config.k_max
        for i, sup in enumerate(supports):
            if len(sup) > kmax:
                raise ValueError(f"image {i}: {len(sup)} supports, the model takes at most k_max={kmax}")
        sc = self.config.scheduler
        steps = num_inference_steps or sc.num_inference_steps
        samples = num_samples or sc.num_samples
        sampler = sampler or sc.sampler
        pil = [_as_image(im, f"images[{i}]") for i, im in enumerate(images)]
        sup_pil = [[(_as_image(im, f"supports[{i}][{j}]"), _as_mask(mk, f"supports[{i}][{j}]"))
                    for j, (im, mk) in enumerate(sup)] for i, sup in enumerate(supports)]
        masks: list[Any] = [None] * n
        probs: list[Any] = [None] * n
        uncs: list[Any] = [None] * n
        fc = self.config.fine
        blend = fc.mode == "auto" and fc.blend > 0
        blend_cfg = dataclasses.replace(fc, max_size=fc.blend_size)
        paths = ["fine" if use_fine([m for _, m in sup], fc, self.config.mask_size) else "blend" if sup and blend
                 else "route" if sup and self.config.matching.mode == "route" else "encoder" for sup in sup_pil]
        for i in (i for i in range(n) if paths[i] == "fine"):
            probs[i] = native_probability(pil[i], sup_pil[i], self.config.matching, self.config.fine)
            uncs[i] = np.sqrt(probs[i] * (1 - probs[i]))  # std of a Bernoulli with the path's probability
            masks[i] = probs[i] > self.config.threshold
        coarse = [i for i in range(n) if paths[i] != "fine"]
        for start in range(0, len(coarse), batch_size):
            idx = coarse[start : start + batch_size]
            x = torch.stack([image_to_tensor(pil[i], self.config.image_size) for i in idx]).to(self.device)
            sup_t = [[(image_to_tensor(im, self.config.image_size).to(self.device),
                       mask_to_tensor(mk, self.config.mask_size).to(self.device)) for im, mk in sup_pil[i]] for i in idx]
            cond = self.encode(x, [texts[i] for i in idx], sup_t)
            p = self.decode(x, cond, [len(s) for s in sup_t], steps, samples, sampler, generator)  # (b, S, M, M)
            mean = p.mean(1).cpu().numpy()
            std = p.std(1, unbiased=False).cpu().numpy()
            for r, i in enumerate(idx):
                hw = (pil[i].height, pil[i].width)
                probs[i] = resize_prob(mean[r], hw)
                uncs[i] = resize_prob(std[r], hw)
                if paths[i] == "blend":  # coarse-to-fine: the model's mask averaged with the propagation at blend_size
                    w = fc.blend
                    fine_prob = fine_propagation(pil[i], sup_pil[i], self.config.matching, blend_cfg)
                    probs[i] = (1 - w) * probs[i] + w * fine_prob
                    uncs[i] = (1 - w) * uncs[i]  # the propagation is deterministic
                masks[i] = probs[i] > self.config.threshold
        pp = self.config.postprocess
        decisions = [decide([m for _, m in sup], pp.min_largest, pp.max_holes) if pp.mode == "auto" else Decision()
                     for sup in sup_pil]
        masks = [apply(m, d, pp.min_fragment, pp.solid_min_fragment) for m, d in zip(masks, decisions)]
        return SegICLOutput(masks, probs, uncs, paths, [d.to_dict() for d in decisions])

