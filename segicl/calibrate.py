"""The path of a task chosen by its own labelled examples, leave-one-out.

nnU-Net decides its post-processing on validation data, per class. An in-context task has no
validation split, but it has labelled examples (a support store's items, or the supports given):
each candidate path segments a few of them, each from the others (another case's supports), and
the path with the best mean Dice segments the task's queries. The ``default`` path (the
checkpoint's settings) keeps the task unless another beats it by ``calibration.margin``: a switch
needs evidence, not noise.

Candidates (:data:`CANDIDATES`):

- ``default``: the configuration as loaded (route or learned matcher, native path for thin
  structures, coarse-to-fine blend, post-processing decided by the supports);
- ``no_blend``: the same without the coarse-to-fine blend (``fine.blend = 0``): the model's own mask
  where the fine propagation misleads (polyps that look like the mucosa around them);
- ``zero_shot``: the supports are not shown to the model (k = 0): for a task the checkpoint already
  knows better than its examples can teach it.

:func:`choose` runs the candidates and returns the decision with every candidate's Dice, which the
caller records (``segment.json``, the evaluation's ``run.json``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CANDIDATES: dict[str, dict[str, Any] | None] = {
    "default": {},
    "no_blend": {"fine": {"blend": 0.0}},
    "zero_shot": None,  # no config change: the supports are dropped
}


@dataclass
class Decision:
    """Which candidate won, the mean Dice of each on the ``n`` examples."""

    path: str = "default"
    dice: dict[str, float] = field(default_factory=dict)
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "n": self.n, "dice": {k: round(v, 4) for k, v in self.dice.items()}}


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two binary masks (1 when both are empty)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(pred.sum() + truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


@contextmanager
def using(pipe, name: str):
    """``pipe`` with candidate ``name``'s settings for the duration of the block (restored after)."""
    from segicl.config import SegICLConfig, merge_overrides

    saved = pipe.config
    overrides = CANDIDATES[name]
    if overrides:
        pipe.config = SegICLConfig.from_dict(merge_overrides(saved.to_dict(), overrides))
    try:
        yield pipe
    finally:
        pipe.config = saved


def segment(pipe, name: str, images: Sequence[Any], texts: Sequence[str], supports: Sequence[Sequence[tuple[Any, Any]]],
            **kwargs: Any):
    """The pipeline's output for ``images`` under candidate ``name`` (``zero_shot``: no supports)."""
    if name not in CANDIDATES:
        raise ValueError(f"unknown calibration candidate {name!r}; choose from {sorted(CANDIDATES)}")
    if name == "zero_shot":
        supports = [[] for _ in images]
    with using(pipe, name):
        return pipe(images=list(images), text=list(texts), supports=[list(s) for s in supports], **kwargs)


def choose(pipe, examples: Sequence[tuple[Any, np.ndarray, Sequence[tuple[Any, Any]]]], text: str = "",
           candidates: Sequence[str] | None = None, margin: float | None = None, seed: int = 0,
           **kwargs: Any) -> Decision:
    """The candidate with the best mean Dice on ``examples``.

    Args:
        pipe: a :class:`segicl.pipeline.SegICLPipeline`.
        examples: (image, binary mask, supports) of labelled items of the task, each with supports
            that do not include it (another case's, as a query would get).
        text: the task's instruction.
        candidates / margin: default ``pipe.config.calibration``'s.
        seed: every candidate draws the same initial noise (a CPU generator seeded with it).
        kwargs: passed to the pipeline (``num_inference_steps``, ``num_samples``).
    """
    import torch

    cal = pipe.config.calibration
    candidates = list(candidates or cal.candidates)
    margin = cal.margin if margin is None else margin
    if "default" not in candidates:
        raise ValueError("the candidates must include 'default'")
    if not examples:
        return Decision()
    images = [e[0] for e in examples]
    sups = [list(e[2]) for e in examples]
    scores = {}
    for name in candidates:
        out = segment(pipe, name, images, [text] * len(images), sups, generator=torch.Generator().manual_seed(seed),
                      **kwargs)
        scores[name] = float(np.mean([dice(m, e[1]) for m, e in zip(out.masks, examples)]))
    best = max(candidates, key=lambda c: scores[c])
    path = best if scores[best] > scores["default"] + margin else "default"
    return Decision(path, scores, len(examples))
