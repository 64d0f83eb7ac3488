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

from segicl.config import FEATURES

IVF_LIST_SIZE = 256  # support patches per inverted list of the approximate search
CONTEXT_SIGMAS = (1.0, 2.0, 4.0)  # multiscale: Gaussian scales in patches (2, 4, 8 px at 2 px patches)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, reflect padding, kernel clipped to the image so small grids still work.
    Written out because torchvision's ``gaussian_blur`` convolves the full 2-D kernel: identical output
    (to 1e-6) but 0.25 s instead of 0.03 s at sigma 8 on 6 x 3 x 160 x 160 (the 2 cores)."""
    side = min(x.shape[-2:])
    r = max(1, min(int(3 * sigma + 0.5), side - 1))
    t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _context_features(images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Multi-scale context of each patch, (n, grid*grid, 15): per scale s in :data:`CONTEXT_SIGMAS`
    the patch's colour minus its Gaussian(2 s) surround (local contrast: is it brighter or darker
    than what lies around it) and the two eigenvalues of the Hessian of its grey value at scale s/2,
    scale-normalised (ridges and valleys: vessels, membranes, thin walls). The classic pixel features
    of trainable segmentation (ilastik, scikit-image ``multiscale_basic_features``), computed on the
    patch grid."""
    x = F.adaptive_avg_pool2d(images, grid)  # one value per patch
    grey = x.mean(1, keepdim=True)
    out = []
    for s in CONTEXT_SIGMAS:
        out.append(x - _blur(x, 2 * s))
        g = _blur(grey, s / 2)
        dy, dx = torch.gradient(g, dim=(2, 3))
        dyy, dyx = torch.gradient(dy, dim=(2, 3))
        dxx = torch.gradient(dx, dim=3)[0]
        half_trace, root = (dxx + dyy) / 2, (((dxx - dyy) / 2) ** 2 + dyx**2).sqrt()
        out.append(torch.cat([half_trace + root, half_trace - root], 1) * (s / 2) ** 2)
    return torch.cat(out, 1).flatten(2).transpose(1, 2)


def _standardise(f: torch.Tensor) -> torch.Tensor:
    return (f - f.mean(1, keepdim=True)) / (f.std(1, keepdim=True) + 1e-6)


def patch_features(images: torch.Tensor, grid: int | tuple[int, int], position: float = 0.0,
                   features: str = "colour") -> torch.Tensor:
    """(n, 3, H, W) images in [-1, 1] -> (n, gh*gw, d) L2-normalised patch features of a ``grid``
    (side, or (rows, columns) for a non-square image) partition, row-major.

    ``features``: ``"colour"`` (15 dims: the mean RGB of the patch's 4 quadrants and its RGB std) or
    ``"multiscale"`` (those 15 plus 15 of :func:`_context_features`, each group standardised over
    the image and weighted equally). ``position`` > 0 appends the patch's (y, x) in [-1, 1] times
    ``position`` (2 more dims)."""
    if features not in FEATURES:
        raise ValueError(f"matching features must be one of {FEATURES}, not {features!r}")
    n = images.shape[0]
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    quads = F.adaptive_avg_pool2d(images, (2 * gh, 2 * gw))
    q = quads.view(n, 3, gh, 2, gw, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, 12)
    var = F.adaptive_avg_pool2d(images**2, (gh, gw)) - F.adaptive_avg_pool2d(images, (gh, gw)) ** 2
    f = _standardise(torch.cat([q, var.clamp(min=0).sqrt().flatten(2).transpose(1, 2)], dim=-1))
    if features == "multiscale":
        f = torch.cat([f, _standardise(_context_features(images, (gh, gw)))], dim=-1)
    if position:
        ys = torch.linspace(-1, 1, gh, device=images.device, dtype=f.dtype)
        xs = torch.linspace(-1, 1, gw, device=images.device, dtype=f.dtype)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pos = torch.stack([yy, xx], -1).view(1, gh * gw, 2).expand(n, -1, -1) * position
        f = torch.cat([f, pos], dim=-1)
    return F.normalize(f, dim=-1)


def _support_sample(vals: torch.Tensor, budget: int, balanced: bool) -> torch.Tensor:
    """Indices of at most ``budget`` support patches, drawn with a fixed seed: with ``balanced``
    half from the foreground patches (value >= 0.5) and half from the background (the rest of the
    budget from the larger class when one is short); without it uniformly."""
    gen = torch.Generator().manual_seed(0)
    if not balanced:
        return torch.randperm(len(vals), generator=gen)[:budget].to(vals.device)
    fg = torch.nonzero(vals >= 0.5).flatten().cpu()
    bg = torch.nonzero(vals < 0.5).flatten().cpu()
    n_fg = min(len(fg), max(budget // 2, budget - len(bg)))
    n_bg = min(len(bg), budget - n_fg)
    pick = [fg[torch.randperm(len(fg), generator=gen)[:n_fg]], bg[torch.randperm(len(bg), generator=gen)[:n_bg]]]
    return torch.cat(pick).to(vals.device)


def _top_k_search(queries: torch.Tensor, keys: torch.Tensor, top_k: int, nprobe: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner-product top-k with faiss: exact (``IndexFlatIP``: BLAS blocks and a heap, 1.4-1.6x faster
    than torch matmul + topk on the 2 cores, without the (n_q, n_keys) matrix in memory), or with
    ``nprobe`` an inverted file (``IndexIVFFlat``, ``len(keys) // 256`` lists, ``nprobe`` of them searched)."""
    import faiss

    k = keys.detach().float().cpu().contiguous().numpy()
    q = queries.detach().float().cpu().contiguous().numpy()
    nlist = len(k) // IVF_LIST_SIZE
    if nprobe is not None and nlist > nprobe:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(k.shape[1]), k.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 0
        index.train(k)
        index.nprobe = nprobe
    else:
        index = faiss.IndexFlatIP(k.shape[1])
    index.add(k)
    sims, idx = index.search(q, top_k)
    missing = idx < 0  # an inverted-file search can return fewer than top_k hits
    if missing.any():
        sims[missing], idx[missing] = -1e4, 0
    return torch.from_numpy(sims).to(queries.device), torch.from_numpy(idx).long().to(queries.device)


def vote(queries: torch.Tensor, keys: torch.Tensor, vals: torch.Tensor, scale: torch.Tensor | float,
         top_k: int | None = None, balanced: bool = False, max_support_patches: int | None = None,
         nprobe: int | None = None) -> torch.Tensor:
    """Label propagation for one query: (n, d) query keys, (m, d) support keys with (m,) mask values
    -> (n,) probabilities (arguments as in :func:`propagate_labels`; ``nprobe``: approximate top-k
    search, see :func:`_top_k_search`)."""
    if max_support_patches is not None and len(vals) > max_support_patches:
        keep = _support_sample(vals, max_support_patches, balanced)
        keys, vals = keys[keep], vals[keep]
    if top_k is not None and top_k < len(vals):
        sims, idx = _top_k_search(queries, keys, top_k, nprobe)
        fg = (torch.softmax(scale * sims, dim=-1) * vals[idx]).sum(-1)  # (n, top_k) weights and values
    else:
        fg = torch.softmax(scale * queries @ keys.T, dim=-1) @ vals
    fg = fg.clamp(0, 1)  # the weights sum to 1: the background vote is 1 - fg
    if balanced:
        pi = vals.mean().clamp(1e-3, 1 - 1e-3)
        fg, bg = fg / pi, (1 - fg) / (1 - pi)
        return fg / (fg + bg).clamp(min=1e-8)
    return fg


def propagate_labels(q_keys: torch.Tensor, s_keys: torch.Tensor, support_masks: torch.Tensor | None, ks: list[int],
                     scale: torch.Tensor | float, top_k: int | None = None, balanced: bool = False,
                     max_support_patches: int | None = None) -> torch.Tensor:
    """Each query patch's softmax(scale * cosine) average of its supports' patch mask values.

    Args:
        q_keys: (b, g*g, d) L2-normalised query patch keys.
        s_keys: (sum k, g*g, d) the supports' keys, item after item.
        support_masks: (b, K, 1, M, M) masks, area-pooled here to g x g (None when every k is 0).
        ks: supports per item.
        scale: inverse temperature.
        top_k: attend to the ``top_k`` most similar support patches only (None: all, differentiable;
            else an exact faiss search, no gradient).
        balanced: compare foreground and background votes divided by the supports' class fractions.
        max_support_patches: vote over at most this many support patches (:func:`_support_sample`,
            class-stratified when ``balanced``); None: all. Keeps fine grids cheap.
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
        out[i] = vote(q_keys[i], s_keys[j : j + k].reshape(k * n, -1), vals, scale, top_k, balanced, max_support_patches)
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
    q = patch_features(query_images, cfg.grid, cfg.position, cfg.features)
    s = patch_features(real, cfg.grid, cfg.position, cfg.features)
    prior = propagate_labels(q, s, support_masks, ks, cfg.scale, cfg.top_k, cfg.balanced, cfg.max_support_patches)
    return F.interpolate(prior, size=(out_size, out_size), mode="bilinear", align_corners=False)
