"""Training-free dense matching: support labels propagated to the query's patches.

Every query patch finds the support patches that look like it and takes the average of their mask
values (label propagation, the non-parametric core of few-shot segmentation: PANet's dense
comparison, the kNN label transfer of PerSAM / Matcher-style methods). It needs no training, so it
works on a modality no part of the model has seen, and it depends on the supports by construction,
which the trained encoder of the tiny models does not (README, "What limits the numbers most").

Features (:func:`patch_features`): per patch of a ``grid x grid`` partition of the image, the mean
RGB of its four quadrants and its RGB standard deviation, standardised over the image's patches
(so brightness and contrast differences between images cancel), plus the patch's (y, x) position
times ``position`` (retrieved supports of aligned modalities put the organ at the same place).

Propagation (:func:`propagate_labels`): softmax(``scale`` x cosine) over the ``top_k`` most similar
support patches. ``balanced`` divides the foreground and background votes by the supports'
foreground and background fractions before comparing them: without it a small structure (a polyp,
the ventricles: 2-10 % of the pixels) never reaches 0.5 because most similar patches of any colour
are background.

The defaults (``MatchingConfig``) were chosen on the *val* split of the three datasets that are never
held out (BUS-BRA, FUSeg, HC18) with k = 5 random supports; the same setting is also best on the
mean over all seven datasets' val splits (README, "Label propagation route").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_features(images: torch.Tensor, grid: int, position: float = 0.0) -> torch.Tensor:
    """(n, 3, S, S) images in [-1, 1] -> (n, grid*grid, 15 [+ 2]) L2-normalised patch features."""
    n = images.shape[0]
    quads = F.adaptive_avg_pool2d(images, 2 * grid)  # (n, 3, 2g, 2g)
    q = quads.view(n, 3, grid, 2, grid, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, 12)
    var = F.adaptive_avg_pool2d(images**2, grid) - F.adaptive_avg_pool2d(images, grid) ** 2
    f = torch.cat([q, var.clamp(min=0).sqrt().flatten(2).transpose(1, 2)], dim=-1)
    f = (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)
    if position:
        lin = torch.linspace(-1, 1, grid, device=images.device, dtype=f.dtype)
        yy, xx = torch.meshgrid(lin, lin, indexing="ij")
        pos = torch.stack([yy, xx], -1).view(1, grid * grid, 2).expand(n, -1, -1) * position
        f = torch.cat([f, pos], dim=-1)
    return F.normalize(f, dim=-1)


def propagate_labels(q_keys: torch.Tensor, s_keys: torch.Tensor, support_masks: torch.Tensor | None, ks: list[int],
                     scale: torch.Tensor | float, top_k: int | None = None, balanced: bool = False) -> torch.Tensor:
    """Each query patch's softmax(scale * cosine) average of its supports' patch mask values.

    Args:
        q_keys: (b, g*g, d) L2-normalised query patch keys.
        s_keys: (sum k, g*g, d) the supports' keys, item after item.
        support_masks: (b, K, 1, M, M) masks, area-pooled here to g x g (None when every k is 0).
        ks: supports per item.
        scale: inverse temperature.
        top_k: attend to the ``top_k`` most similar support patches only (None: all).
        balanced: compare foreground and background votes divided by the supports' class fractions.
    Returns:
        (b, 1, g, g) prior in [0, 1], zeros where k = 0.
    """
    b, n, _ = q_keys.shape
    g = int(round(n**0.5))
    out = q_keys.new_zeros(b, n)
    j = 0
    for i, k in enumerate(ks):
        if not k:
            continue
        vals = F.adaptive_avg_pool2d(support_masks[i, :k].float(), g).flatten().to(q_keys.dtype)  # (k*g*g,)
        keys = s_keys[j : j + k].reshape(k * n, -1)
        logits = scale * q_keys[i] @ keys.T  # (g*g, k*g*g)
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        w = torch.softmax(logits, dim=-1)
        if balanced:
            pi = vals.mean().clamp(1e-3, 1 - 1e-3)
            fg, bg = (w @ vals) / pi, (w @ (1 - vals)) / (1 - pi)
            out[i] = fg / (fg + bg).clamp(min=1e-8)
        else:
            out[i] = w @ vals
        j += k
    return out.view(b, 1, g, g)


def match_supports(query_images: torch.Tensor, support_images: torch.Tensor, support_masks: torch.Tensor,
                   ks: list[int], cfg, out_size: int) -> torch.Tensor:
    """The label-propagation prior of each query at ``out_size`` (bilinear), zeros where k = 0.

    Args:
        query_images: (b, 3, S, S) in [-1, 1].
        support_images: (b, K, 3, S, S), padded beyond each item's k.
        support_masks: (b, K, 1, M, M) binary.
        ks: supports per item.
        cfg: a :class:`segicl.config.MatchingConfig` (grid, scale, position, top_k, balanced).
        out_size: side of the returned map.
    Returns:
        (b, 1, out_size, out_size) in [0, 1].
    """
    real = torch.cat([support_images[i, :k] for i, k in enumerate(ks) if k]) if sum(ks) else support_images[:0, 0]
    q = patch_features(query_images, cfg.grid, cfg.position)
    s = patch_features(real, cfg.grid, cfg.position)
    prior = propagate_labels(q, s, support_masks, ks, cfg.scale, cfg.top_k, cfg.balanced)
    return F.interpolate(prior, size=(out_size, out_size), mode="bilinear", align_corners=False)
