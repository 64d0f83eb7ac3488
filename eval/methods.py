"""Method adapters: every compared method behind one interface.

A method answers one query at a time::

    prob, uncertainty = method.predict(query, supports, text, seed)
    # prob: (H, W) float in [0, 1] at the query's stored resolution; uncertainty: (H, W) or None

and may need a one-off preparation per binary task (the supervised U-Net trains there)::

    method.prepare(dataset, label_value, split="train")

Method specifications (``--methods``)::

    segicl                 the SegICL pipeline (checkpoint from --checkpoint; "preset:tiny" = random tiny)
    labelprop              training-free label propagation from the k supports (segicl/matching.py; no
                           weights): the non-parametric reference every in-context model must beat
    vlsm:<saved dir>       a VLSM baseline saved with ``VLSMModel.save_pretrained`` (no supports)
    unet_supervised        MONAI UNet trained on the task's train split (the ceiling)
    unet_fewshot           MONAI UNet trained on the same k supports the in-context methods see (the floor)
    universeg:<saved dir>  the UniverSeg-style in-context comparator (segicl/universeg.py), trained with
                           ``segicl train universeg`` on the same tasks as SegICL (k >= 1)

Seeds: :func:`derive_seed` turns any tuple of ints and strings into a 63-bit seed through SHA-256,
so a seed depends only on what it names (run seed, dataset, label, stem, draw), never on the order
in which the suite reaches it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from eval.unet import UNetConfig, UNetSegmenter, train_unet
from segicl.data import Sample, SegDataset

METHOD_KINDS = ("segicl", "labelprop", "vlsm", "unet_supervised", "unet_fewshot", "universeg")
PRESET_PREFIX = "preset:"


def derive_seed(*parts: int | str) -> int:
    """A seed in [0, 2**63) determined by ``parts`` alone (stable across runs and platforms)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class Method:
    """Base class of the compared methods.

    Attributes:
        name: the name in results.csv (the ``--methods`` spec).
        uses_supports: the method takes k support pairs (it is evaluated for every k and policy).
        min_k: smallest k the method can use (a few-shot U-Net needs at least one example).
        stochastic: different seeds give different outputs (evaluated for every draw even without supports).
    """

    name: str = "method"
    uses_supports: bool = False
    min_k: int = 0
    stochastic: bool = False
    source: str = "none"  # the "supports" column of a method without supports ("train": the full train split)

    def prepare(self, dataset: SegDataset, label_value: int, split: str = "train") -> None:
        """Per-task preparation before any query of ``(dataset, label_value)``; default: nothing."""

    def predict(
        self, query: Sample, supports: list[Sample], text: str, seed: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment ``query``.

        Args:
            query: the query sample (its mask must not be read).
            supports: k labelled examples of the same task (empty for k = 0 or support-free methods).
            text: the task's text instruction.
            seed: seed for any randomness of this prediction.

        Returns:
            ``(prob, uncertainty)``: (H, W) float arrays at the query's stored resolution; uncertainty
            may be None.
        """
        raise TypeError(f"{type(self).__name__} must implement predict()")

    def close(self) -> None:
        """Release large state (models, caches) once the suite is done with the method."""


# ------------------------------------------------------------------------------------- SegICL
class SegICLMethod(Method):
    """The SegICL pipeline: text + k (image, mask) supports + query -> probability and uncertainty."""

    uses_supports = True
    stochastic = True

    def __init__(self, pipe: Any, steps: int | None = None, samples: int | None = None, name: str = "segicl"):
        self.pipe = pipe
        self.steps = steps
        self.samples = samples
        self.name = name
        self.task: tuple[SegDataset, int, str] | None = None
        self.decisions: dict[tuple[str, int, int, str], Any] = {}  # (dataset, label, k, policy) -> calibrate.Decision
        self.support_source: tuple[str, Any] | None = None  # (policy, source) of set_support_source

    def prepare(self, dataset: SegDataset, label_value: int, split: str = "train") -> None:
        self.task = (dataset, int(label_value), split)

    def _kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.steps is not None:
            kwargs["num_inference_steps"] = int(self.steps)
        if self.samples is not None:
            kwargs["num_samples"] = int(self.samples)
        return kwargs

    def set_support_source(self, policy: str, source: Any) -> None:
        """Where calibration examples get their supports: ``source(item, k)`` -> supports of a train item, drawn
        as the evaluated queries' are (the suite passes its provider of the current policy)."""
        self.support_source = (policy, source)

    def path_for(self, k: int, text: str) -> str:
        """The calibrated candidate of the current task at ``k`` supports (``calibration.mode = auto``): decided
        once per task, k and support policy on labelled train items of the task, each with k supports drawn by
        the same policy as the queries (never the evaluated split)."""
        from segicl import calibrate

        cal = self.pipe.config.calibration
        if cal.mode != "auto" or not k or self.task is None or self.support_source is None:
            return "default"
        ds, label, split = self.task
        policy, source = self.support_source
        key = (ds.name, label, k, policy)
        if key not in self.decisions:
            rng = np.random.default_rng(derive_seed(0, "calibration", ds.name, label, k))
            stems = ds.stems(split)
            examples = []
            for i in rng.permutation(len(stems)):
                item = ds.sample(stems[i], label)
                sup = source(item, k)
                if len(sup) < k:
                    continue
                examples.append((item.image, item.mask, [(s.image, s.mask) for s in sup]))
                if len(examples) == cal.examples:
                    break
            self.decisions[key] = calibrate.choose(self.pipe, examples, text, seed=derive_seed(0, "calibration-noise"),
                                                   **self._kwargs())
        return self.decisions[key].path

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from segicl import calibrate

        path = self.path_for(len(supports), text)
        out = calibrate.segment(self.pipe, path, [query.image], [text], [[(s.image, s.mask) for s in supports]],
                                generator=torch.Generator().manual_seed(int(seed)), **self._kwargs())
        prob = np.asarray(out.probabilities[0], dtype=np.float32)
        pp = getattr(out, "postprocess", None)
        if pp and any(pp[0].values()):  # the mask was post-processed: the probability is clipped to agree with it
            thr = np.float32(self.pipe.config.threshold)
            prob = np.where(out.masks[0], np.maximum(prob, np.nextafter(thr, np.float32(1))),
                            np.minimum(prob, np.nextafter(thr, np.float32(0)))).astype(np.float32)
        unc = getattr(out, "uncertainty", None)
        return prob, (np.asarray(unc[0], dtype=np.float32) if unc is not None and unc[0] is not None else None)

    def close(self) -> None:
        self.pipe = None


def load_segicl(checkpoint: str | Path | None, seed: int = 0) -> tuple[Any, str]:
    """Load the SegICL pipeline.

    Args:
        checkpoint: a saved pipeline directory; ``"preset:<name>"`` for random weights of a preset
            (smoke tests); None for the shipped default checkpoint.
        seed: initialisation seed of a random preset.

    Returns:
        ``(pipeline, description)`` where description names what was loaded (for run.json).
    """
    from segicl import pipeline as seg_pipeline

    if checkpoint is not None and str(checkpoint).startswith(PRESET_PREFIX):
        preset = str(checkpoint)[len(PRESET_PREFIX) :]
        return seg_pipeline.SegICLPipeline.from_preset(preset, seed=seed), f"{checkpoint} (random weights, seed {seed})"
    if checkpoint is None:
        default = getattr(seg_pipeline, "default_checkpoint", None)
        if default is None:
            raise ValueError("no --checkpoint given and segicl.pipeline has no default_checkpoint()")
        checkpoint = default()
    return seg_pipeline.SegICLPipeline.from_pretrained(str(checkpoint)), str(checkpoint)


# --------------------------------------------------------------------------------- labelprop
class LabelPropagation(Method):
    """Training-free label propagation (:mod:`segicl.matching`): each query patch takes the support
    labels of the support patches that look like it; the prior map, resized to the query, is the
    probability. Settings: the ``labelprop`` block of the eval config (MatchingConfig fields and
    ``size``, the side images are resized to), defaults = the SegICL matching defaults at 64 px."""

    name = "labelprop"
    uses_supports = True
    min_k = 1

    def __init__(self, config: dict | None = None):
        from segicl.config import MatchingConfig

        cfg = dict(config or {})
        self.size = int(cfg.pop("size", 64))
        cfg.pop("mode", None)
        try:
            self.cfg = MatchingConfig(**cfg)
            self.cfg.validate(self.size, active=True)
        except (TypeError, ValueError) as e:
            raise ValueError(f"eval config block 'labelprop': {e}") from None

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from segicl.data.transforms import image_to_tensor, mask_to_tensor, resize_prob
        from segicl.matching import match_supports

        if not supports:
            raise ValueError("labelprop needs at least one support")
        q = image_to_tensor(query.image, self.size)[None]
        simg = torch.stack([image_to_tensor(s.image, self.size) for s in supports])[None]
        smask = torch.stack([mask_to_tensor(s.mask, self.size) for s in supports])[None]
        with torch.no_grad():
            prior = match_supports(q, simg, smask, [len(supports)], self.cfg, self.size)[0, 0]
        return resize_prob(prior, query.mask.shape), None


# ---------------------------------------------------------------------------------- UniverSeg
class UniverSegMethod(Method):
    """The UniverSeg-style comparator: k >= 1 supports + query -> probability, at the model's size."""

    uses_supports = True
    min_k = 1

    def __init__(self, path: str | Path, name: str):
        from segicl.universeg import UniverSeg

        self.model, self.name = UniverSeg.from_pretrained(path), name

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        from segicl.data.transforms import image_to_tensor, mask_to_tensor, resize_prob

        if not supports:
            raise ValueError("universeg needs at least one support")
        size = self.model.cfg.size
        q = image_to_tensor(query.image, size)[None]
        simg = torch.stack([image_to_tensor(s.image, size) for s in supports])[None]
        smask = torch.stack([mask_to_tensor(s.mask, size) for s in supports])[None]
        with torch.no_grad():
            prob = torch.sigmoid(self.model(q, simg, smask))[0, 0]
        return resize_prob(prob, query.mask.shape), None


# --------------------------------------------------------------------------------------- VLSM
class VLSMMethod(Method):
    """A saved VLSM baseline (CLIPSeg / CRIS / BiomedCLIPSeg, any tuning mode): text + query, no supports.

    The text is the suite's instruction, or with ``prompt_level`` (eval config ``vlsm: {prompt_level:
    p1}``, ``segicl evaluate --vlsm-prompt p1``) the P0-P9 prompt of that level as the model was
    trained with (``segicl.vlsm.prompts.PromptSampler``: prompts.json where the dataset ships it, else
    generated from the query's mask, an oracle for P2-P9 as in medvlsm)."""

    def __init__(self, model: Any, name: str, prompt_level: str | None = None):
        from segicl.vlsm.prompts import PromptSampler

        self.model = model
        self.name = name
        self.sampler = PromptSampler(prompt_level) if prompt_level else None
        self.dataset: SegDataset | None = None

    def prepare(self, dataset: SegDataset, label_value: int, split: str = "train") -> None:
        self.dataset = dataset  # prompts.json of the queries' dataset

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.sampler is not None:
            text = self.sampler(query, self.dataset)
        prob = self.model.predict([query.image], [text])[0]
        return np.asarray(prob, dtype=np.float32), None

    def close(self) -> None:
        self.model = None


# -------------------------------------------------------------------------------------- U-Nets
class UNetSupervised(Method):
    """The ceiling: a U-Net per task trained on the dataset's train split (cfg.max_train_items caps it)."""

    name = "unet_supervised"
    source = "train"

    def __init__(self, cfg: UNetConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self.key: tuple[str, int] | None = None
        self.model: UNetSegmenter | None = None
        self.training_log: list[dict] = []  # one entry per trained task (run.json "training")

    def prepare(self, dataset: SegDataset, label_value: int, split: str = "train") -> None:
        key = (dataset.name, int(label_value))
        if self.key == key and self.model is not None:
            return
        self.model, self.key = None, None  # a failed training must not leave another task's model
        stems = dataset.stems(split)
        seed = derive_seed(self.seed, "unet_supervised", dataset.name, label_value)
        if self.cfg.max_train_items is not None and len(stems) > self.cfg.max_train_items:
            rng = np.random.default_rng(seed)
            stems = sorted(rng.choice(stems, size=self.cfg.max_train_items, replace=False).tolist())
        samples = [dataset.sample(s, label_value) for s in stems]
        val = ([dataset.sample(s, label_value) for s in dataset.stems("val")]
               if self.cfg.val_every > 0 and "val" in dataset.splits else None)
        self.model = train_unet(samples, self.cfg, seed, val)
        self.key = key
        self.training_log.append({"dataset": dataset.name, "label": dataset.labels[int(label_value)],
                                  "train_items": self.model.train_items, "steps": self.model.steps_run,
                                  "best_step": self.model.best_step, "best_val_dice": self.model.best_val_dice,
                                  "seconds": round(self.model.seconds, 2)})

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        if self.model is None or self.key != (query.dataset, query.label_value):
            raise RuntimeError(f"unet_supervised was not prepared for {query.dataset}/{query.label}")
        return self.model.predict(query.image), None

    def close(self) -> None:
        self.model = None


class UNetFewShot(Method):
    """The floor: a U-Net trained on exactly the query's k supports.

    Models are cached by support set (an LRU of ``cache_size``), so a support set shared by many
    queries (random policy) trains once. The training seed comes from the run seed and the support
    stems, so the model for a set is the same whichever query reaches it first.
    """

    name = "unet_fewshot"
    uses_supports = True
    min_k = 1

    def __init__(self, cfg: UNetConfig, seed: int = 0, cache_size: int = 16):
        self.cfg = cfg
        self.seed = seed
        self.cache_size = cache_size
        self.cache: OrderedDict[tuple, UNetSegmenter] = OrderedDict()

    def predict(self, query: Sample, supports: list[Sample], text: str, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
        if not supports:
            raise ValueError("unet_fewshot needs at least one support")
        stems = tuple(s.stem for s in supports)
        key = (query.dataset, query.label_value, stems)
        model = self.cache.get(key)
        if model is None:
            model = train_unet(supports, self.cfg, derive_seed(self.seed, "unet_fewshot", *key[:2], *stems))
            self.cache[key] = model
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        return model.predict(query.image), None

    def close(self) -> None:
        self.cache.clear()


# ------------------------------------------------------------------------------------ builders
def parse_spec(spec: str) -> tuple[str, str | None]:
    """``"vlsm:runs/clipseg"`` -> ``("vlsm", "runs/clipseg")``; ``"unet_fewshot"`` -> ``("unet_fewshot", None)``."""
    spec = spec.strip()
    kind, _, arg = spec.partition(":")
    if kind not in METHOD_KINDS:
        raise ValueError(f"unknown method {spec!r}; choose from segicl, labelprop, vlsm:<saved dir>, unet_supervised, "
                         "unet_fewshot, universeg:<saved dir>")
    if kind in ("vlsm", "universeg") and not arg:
        raise ValueError(f"the {kind} method needs its saved model directory: {kind}:<dir>")
    if kind in ("labelprop", "unet_supervised", "unet_fewshot") and arg:
        raise ValueError(f"{kind} takes no argument, got {spec!r}")
    return kind, (arg or None)


def method_class(spec: str) -> type[Method]:
    """The class a spec builds; its class attributes tell the suite how to evaluate it."""
    kind, _ = parse_spec(spec)
    classes: dict[str, type[Method]] = {
        "segicl": SegICLMethod, "labelprop": LabelPropagation, "vlsm": VLSMMethod, "unet_supervised": UNetSupervised, "unet_fewshot": UNetFewShot,
        "universeg": UniverSegMethod,
    }  # fmt: skip
    return classes[kind]


def build_method(
    spec: str,
    config: dict,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    steps: int | None = None,
    samples: int | None = None,
) -> tuple[Method, dict[str, str]]:
    """Build one method from its spec.

    Args:
        spec: see the module docstring.
        config: the eval config (blocks ``unet_supervised``, ``unet_fewshot``, ``segicl``).
        seed: run seed (U-Net initialisation; random SegICL presets).
        checkpoint: SegICL checkpoint (dir, ``preset:<name>`` or None for the default).
        steps, samples: SegICL inference steps and diffusion samples (override ``config["segicl"]``).

    Returns:
        ``(method, provenance)``: provenance maps what was loaded to a description for run.json.
    """
    kind, arg = parse_spec(spec)
    if kind == "segicl":
        pipe, desc = load_segicl(checkpoint if checkpoint is not None else arg, seed=seed)
        scfg = dict(config.get("segicl") or {})
        if scfg.get("matching") is not None:  # override the checkpoint's matching.mode ("none" / "route")
            pipe.set_matching(mode=scfg["matching"])
            desc += f" (matching.mode = {scfg['matching']})"
        if scfg.get("dense_condition") is not None:  # override lm.dense_condition ("tokens" / "mask")
            pipe.set_lm(dense_condition=scfg["dense_condition"])
            desc += f" (lm.dense_condition = {scfg['dense_condition']})"
        if scfg.get("fine") is not None:  # override fine.mode ("none" / "auto" / "always")
            pipe.set_fine(mode=scfg["fine"])
            desc += f" (fine.mode = {scfg['fine']})"
        if scfg.get("native_classifier") is not None:  # override fine.classifier ("forest" / "vote")
            pipe.set_fine(classifier=scfg["native_classifier"])
            desc += f" (fine.classifier = {scfg['native_classifier']})"
        if scfg.get("blend") is not None:  # override fine.blend (0 = the route's probability alone)
            pipe.set_fine(blend=float(scfg["blend"]))
            desc += f" (fine.blend = {scfg['blend']})"
        if scfg.get("postprocess") is not None:  # override postprocess.mode ("none" / "auto")
            pipe.set_postprocess(mode=scfg["postprocess"])
            desc += f" (postprocess.mode = {scfg['postprocess']})"
        if scfg.get("calibration") is not None:  # override calibration.mode ("none" / "auto")
            pipe.set_calibration(mode=scfg["calibration"])
            desc += f" (calibration.mode = {scfg['calibration']})"
        method = SegICLMethod(pipe, steps if steps is not None else scfg.get("steps"),
                              samples if samples is not None else scfg.get("samples"), name=spec.strip())
        return method, {spec: desc}
    if kind == "labelprop":
        method = LabelPropagation(config.get("labelprop"))
        return method, {spec: f"label propagation {method.cfg} at {method.size} px (no weights)"}
    if kind == "vlsm":
        from segicl.vlsm import load_vlsm

        path = Path(arg)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: VLSM model directory not found (save one with VLSMModel.save_pretrained)")
        level = (config.get("vlsm") or {}).get("prompt_level")
        desc = str(path.resolve()) + (f" (prompt level {level})" if level else "")
        return VLSMMethod(load_vlsm(path), name=spec.strip(), prompt_level=level), {spec: desc}
    if kind == "universeg":
        path = Path(arg)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: UniverSeg model directory not found (train one with segicl train universeg)")
        return UniverSegMethod(path, name=spec.strip()), {spec: str(path.resolve())}
    ucfg = UNetConfig.from_dict(config.get(kind))
    method = UNetSupervised(ucfg, seed) if kind == "unet_supervised" else UNetFewShot(ucfg, seed)
    return method, {spec: f"MONAI UNet {ucfg}"}
