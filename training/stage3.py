"""Stage 3 (ours, not in the paper): adapt the decoder to the encoder's predicted tokens S.

``build_stage3_task(config, data_dirs, exclude) -> (task, train_dataset, val_fn)`` for the shared loop
(``segicl train stage3 --config configs/train/tiny_stage3.yaml``). ``model.init`` is the stage-2
pipeline; the multimodal encoder and the condition encoder are frozen, the decoder (UNet, ControlNet,
spatial condition map) trains with the same diffusion loss as stage 1, but conditioned on
S = encoder(text, supports, query) of in-context episodes instead of on C = condition_encoder(mask).

Why: stage 2 regresses C with MSE, so S is close to the *mean* of plausible C (cosine 0.84 to C on
training episodes) and lies off the set of crisp tokens the stage-1 decoder learned to render. Measured
on the tiny preset after 500 stage-2 steps: the decoder rendered the true C at val Dice 0.98 but the
predicted S at 0.08 (k = 0) / 0.13 (k = 5), mostly empty masks. Teaching the decoder to render the
ground-truth mask from S (with the query image as hint) closes that gap without touching the encoder.
``data.true_c_prob`` keeps a fraction of items on the true C so the decoder still renders C.

``data.route_prob`` (for ``matching.mode = "route"``, segicl/matching.py): that fraction of the items
with supports is conditioned on the condition encoder's tokens of the thresholded label-propagation
mask instead, so the decoder learns to turn a coarse matched mask plus the query image into the true
mask. ``model.matching`` (a dict of :class:`segicl.config.MatchingConfig` fields) overrides the
pipeline's matching settings; the saved pipeline keeps them (so ``{mode: route}`` makes the
checkpoint use the route at inference).

``model.route_decoder: true`` keeps a frozen copy of the incoming decoder (the stage-1 one, which
renders crisp condition tokens best) as the pipeline's ``route_decoder``: items with supports are
then rendered by it under the route, items without by the decoder this stage adapts to S. Measured on
held-out datasets: README, "Label propagation route".
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segicl.pipeline import SegICLPipeline
from training.common import PipelineTask, adamw_with_schedule, at_mask_size
from training.stage2 import episode_data


class Stage3Task(PipelineTask):
    def __init__(self, pipe: SegICLPipeline, train_cfg: dict[str, Any], true_c_prob: float = 0.0, route_prob: float = 0.0):
        super().__init__()
        self.pipe = pipe
        self.decoder = pipe.decoder
        self._frozen = (pipe.encoder.requires_grad_(False).eval(), pipe.condition_encoder.requires_grad_(False).eval())
        self.train_cfg = train_cfg
        self.true_c_prob = float(true_c_prob)
        self.route_prob = float(route_prob)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        enc, ce = self._frozen
        m = self.pipe.config.mask_size
        q, qm = batch["query_image"], at_mask_size(batch["query_mask"], m)
        simg, smask, ks = batch["support_images"], at_mask_size(batch["support_masks"], m), batch["num_supports"]
        b, k = simg.shape[:2]
        with torch.no_grad():
            c = ce(qm)
            if k:
                scond = ce(smask.flatten(0, 1)).view(b, k, *c.shape[1:])
                s = enc(list(batch["text"]), q, simg, scond, ks, support_masks=smask)
            else:
                s = enc(list(batch["text"]), q)
            if self.true_c_prob > 0:
                use_c = (torch.rand(b, device=c.device) < self.true_c_prob).view(b, 1, 1)
                s = torch.where(use_c, c, s)
            if self.route_prob > 0 and k:
                ks_list = [int(x) for x in ks]
                routed = self.pipe.route_condition(self.pipe.match(q, simg, smask, ks_list))
                has = torch.tensor([x > 0 for x in ks_list], device=c.device)
                use_r = ((torch.rand(b, device=c.device) < self.route_prob) & has).view(b, 1, 1)
                s = torch.where(use_r, routed, s)
        return self.decoder.loss(q, qm, s, self.pipe.scheduler, cond_dropout=0.0, cond_noise=0.0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.decoder.parameters() if p.requires_grad]

    def configure_optimizers(self):
        return adamw_with_schedule(self.trainable_parameters(), self.train_cfg, default_lr=1e-4)

    def save_pretrained(self, path: str | Path) -> Path:
        return self.pipe.save_pretrained(path, extra={"stage": 3})


def build_stage3_task(config: dict[str, Any], data_dirs: Sequence[str | Path], exclude: Sequence[str] = ()):
    mcfg = config.get("model", {})
    train_cfg = config.get("train", {})
    data_cfg = config.get("data", {})
    init = mcfg.get("init")
    if not init:
        raise ValueError("stage 3 needs model.init: the stage-2 checkpoint directory (a saved pipeline)")
    pipe = SegICLPipeline.from_pretrained(init)
    if mcfg.get("matching"):
        pipe.set_matching(**mcfg["matching"])
    if mcfg.get("route_decoder"):  # keep the incoming (stage-1) decoder, frozen, for the matching route
        if pipe.route_decoder is None:
            pipe.route_decoder = copy.deepcopy(pipe.decoder)
        pipe.route_decoder.requires_grad_(False).eval()
    pipe.decoder.requires_grad_(True)
    task = Stage3Task(pipe, train_cfg, float(data_cfg.get("true_c_prob", 0.0)), float(data_cfg.get("route_prob", 0.0)))
    task.train()
    task._frozen[0].eval()
    train_ds, val_fn = episode_data(pipe, config, data_dirs, exclude, seed_offset=3)
    return task, train_ds, val_fn
