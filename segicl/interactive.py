"""Interactive in-context segmentation: clicks, boxes and scribbles on the query, a context that grows.

A user segments a new dataset image by image. Each image gets a proposal from the images already
finished (the *context*), the user corrects it with interactions, accepts it, and it joins the
context for the next image (MultiverSeg's workflow). Training-free, so it works on any modality:

1. **Context prior** (:class:`InteractiveSegmenter`): the label propagation of :mod:`segicl.matching`
   at the query's resolution (multi-scale patch features, 2 px patches, longer side capped at
   ``max_size``), voting over the patches of the ``max_context`` context images nearest to the query
   (pixel embedder of :mod:`retrieval.embedders`). The context images' patch features are computed
   once, when they join (the analogue of a language model's prefix cache); a query's search over
   them is computed once per query and context version, so an interaction does not redo either.
2. **Clicks as labelled points**: the query's own patches under the interactions join the vote as
   labelled support patches (the interaction's label), merged into the cached top-k; when the user
   has marked only foreground and there is no context, the image border is taken as background.
3. **Random walker with a prior** (:func:`random_walk`): the interactions are hard seeds, the vote
   is a per-pixel prior weighted by its confidence, and image edges stop the diffusion (Grady,
   *Random walks for image segmentation*, 2006; the prior term of Grady 2005 *Multilabel random
   walker image segmentation using prior models*). Solved on the patch grid with scipy's conjugate
   gradient. scikit-image's ``random_walker`` has no prior term, which the context needs: without it
   an image with no interactions would have no answer, and a click would erase the context far
   from it.

The learned SegICL model is not in this loop: no model of the project takes interactions as input
(see docs/interactive.md for what was measured and what is missing).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

from segicl.matching import _top_k_search, patch_features
from segicl.native import _image, _patch_values, working_shape

Point = tuple[int, int]  # (row, column) in the image's pixels


@dataclass
class Interactions:
    """A user's interactions on one image, in the image's pixel coordinates (row, column)."""

    pos_points: list[Point] = field(default_factory=list)
    neg_points: list[Point] = field(default_factory=list)
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (y0, x0, y1, x1), inclusive
    pos_scribbles: list[list[Point]] = field(default_factory=list)
    neg_scribbles: list[list[Point]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.pos_points or self.neg_points or self.boxes or self.pos_scribbles or self.neg_scribbles)

    @property
    def count(self) -> int:
        """Interactions so far (a click, a box or a scribble counts one)."""
        return (len(self.pos_points) + len(self.neg_points) + len(self.boxes) + len(self.pos_scribbles)
                + len(self.neg_scribbles))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Interactions:
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown interaction fields {sorted(unknown)}")

        def pts(v, what):
            out = []
            for p in v:
                if len(p) != 2:
                    raise ValueError(f"{what}: a point is (row, column), got {p!r}")
                out.append((int(p[0]), int(p[1])))
            return out

        boxes = []
        for b in d.get("boxes", []):
            if len(b) != 4:
                raise ValueError(f"boxes: a box is (y0, x0, y1, x1), got {b!r}")
            y0, x0, y1, x1 = (int(v) for v in b)
            boxes.append((min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)))
        return cls(pts(d.get("pos_points", []), "pos_points"), pts(d.get("neg_points", []), "neg_points"), boxes,
                   [pts(s, "pos_scribbles") for s in d.get("pos_scribbles", [])],
                   [pts(s, "neg_scribbles") for s in d.get("neg_scribbles", [])])

    def seeds(self, shape: tuple[int, int], scale: tuple[float, float], radius: int, box_margin: float
              ) -> np.ndarray:
        """The interactions rasterised on a ``shape`` grid (image pixels times ``scale`` (sy, sx)):
        int8, 1 = foreground, 2 = background, 0 = unknown. Clicks are discs of ``radius`` cells,
        scribbles polylines of that width; a box marks what lies ``box_margin`` x its size outside it
        as background. Later marks of the other label win over earlier ones where they overlap."""
        h, w = shape
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)

        def xy(p):  # the cell holding the pixel, (x, y) for PIL
            return (min(max(int(p[1] * scale[1]), 0), w - 1), min(max(int(p[0] * scale[0]), 0), h - 1))

        for y0, x0, y1, x1 in self.boxes:
            my, mx = box_margin * (y1 - y0 + 1), box_margin * (x1 - x0 + 1)
            inside = Image.new("L", (w, h), 2)
            lo, hi = xy((max(y0 - my, 0), max(x0 - mx, 0))), xy((y1 + my, x1 + mx))
            ImageDraw.Draw(inside).rectangle([lo, hi], fill=0)
            img = Image.fromarray(np.maximum(np.asarray(img), np.asarray(inside)))
            draw = ImageDraw.Draw(img)
        for label, points, scribbles in ((1, self.pos_points, self.pos_scribbles), (2, self.neg_points, self.neg_scribbles)):
            for s in scribbles:
                if len(s) > 1:
                    draw.line([xy(p) for p in s], fill=label, width=2 * radius + 1, joint="curve")
                points = list(points) + list(s)
            for p in points:
                x, y = xy(p)
                if radius:
                    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=label)
                else:
                    draw.point((x, y), fill=label)
        return np.asarray(img, dtype=np.int8)


@dataclass
class InteractiveConfig:
    """Settings of :class:`InteractiveSegmenter` (defaults chosen on val splits: docs/interactive.md)."""

    max_size: int = 256  # longer side of the working image (aspect kept)
    patch: int = 2  # pixels per patch side at the working size
    features: str = "multiscale"  # patch features of segicl/matching.py
    position: float = 1.0  # weight of the patch position in the features
    scale: float = 100.0  # vote softmax inverse temperature
    top_k: int = 20  # support patches each query patch votes over
    max_context: int = 10  # nearest context images a query votes over
    max_context_patches: int = 16384  # class-stratified sample of their patches
    nprobe: int | None = 8  # faiss inverted file over the context patches (segicl.matching); None = exact
    click_radius: int = 1  # patches; a click's disc
    box_margin: float = 0.05  # a box marks what lies this fraction of its size outside it as background
    box_centre: float = 0.2  # ... and, with no positive mark, a disc of this fraction of its side at its centre foreground
    beta: float = 1.0  # random-walker edge weight exp(-beta d^2 / mean d^2)
    prior_weight: float = 0.002  # random-walker weight of the (confidence-weighted) prior
    click_weight: float = 1.0  # weight of the vote over the query's labelled patches (logit space)
    random_walk: bool = True  # False: the vote alone, interactions as labelled points (the labelprop baseline)
    click_rw: bool = True  # with a click network: its probability is the prior of the random walker (val: fewer clicks)
    threshold: float = 0.5

    def validate(self) -> None:
        if self.patch < 1 or self.max_size < 8 * self.patch:
            raise ValueError(f"interactive: patch >= 1 and max_size >= 8 patches, not {self.patch} / {self.max_size}")
        if self.top_k < 1 or self.max_context < 1 or self.max_context_patches < 1:
            raise ValueError("interactive: top_k, max_context and max_context_patches must be positive")
        if self.beta < 0 or self.prior_weight < 0:
            raise ValueError("interactive: beta and prior_weight must be >= 0")


@dataclass
class InteractiveOutput:
    prob: np.ndarray  # (H, W) float32 in [0, 1] at the image's resolution
    mask: np.ndarray  # (H, W) bool
    uncertainty: np.ndarray  # (H, W) float32: sqrt(p (1 - p))
    seconds: float
    context_used: list[str]


def random_walk(features: np.ndarray, seeds: np.ndarray, prior: np.ndarray | None, prior_weight: float,
                beta: float) -> np.ndarray:
    """Foreground probability of every cell of a grid from labelled seeds and a prior.

    Minimises sum_edges w_ij (x_i - x_j)^2 + prior_weight sum_i c_i (x_i - p_i)^2 with x = 1 on
    foreground seeds and 0 on background seeds, w_ij = exp(-beta d_ij^2 / mean d^2) over the 4-neighbour
    edges (d: feature distance), c_i = |2 p_i - 1| (a prior of 0.5 says nothing).

    Args:
        features: (h, w, c) per-cell features (e.g. the mean colour of the patch).
        seeds: (h, w) int8, 1 foreground, 2 background, 0 unknown.
        prior: (h, w) in [0, 1], or None (then there must be seeds of both labels).
    Returns:
        (h, w) float32 in [0, 1].
    """
    import scipy.sparse as sp
    from scipy.sparse.linalg import cg

    h, w = seeds.shape
    n = h * w
    f = features.reshape(h, w, -1).astype(np.float64)
    idx = np.arange(n).reshape(h, w)
    d2 = [((f[:, 1:] - f[:, :-1]) ** 2).sum(-1).ravel(), ((f[1:] - f[:-1]) ** 2).sum(-1).ravel()]
    mean = max(float(np.concatenate(d2).mean()), 1e-12)
    wts = np.concatenate([np.exp(-beta * d / mean) for d in d2]) + 1e-6
    i = np.concatenate([idx[:, :-1].ravel(), idx[:-1].ravel()])
    j = np.concatenate([idx[:, 1:].ravel(), idx[1:].ravel()])
    W = sp.coo_matrix((np.concatenate([wts, wts]), (np.concatenate([i, j]), np.concatenate([j, i]))), shape=(n, n)).tocsr()
    s = seeds.ravel()
    x = np.full(n, 0.5) if prior is None else prior.ravel().astype(np.float64).clip(0, 1)
    c = np.zeros(n) if prior is None else prior_weight * np.abs(2 * x - 1)
    known = s > 0
    if prior is None and not ((s == 1).any() and (s == 2).any()):
        raise ValueError("random_walk: without a prior the seeds need both labels")
    x[s == 1], x[s == 2] = 1.0, 0.0
    u = ~known
    if not u.any():
        return x.reshape(h, w).astype(np.float32)
    deg = np.asarray(W.sum(1)).ravel()
    A = (sp.diags(deg[u] + c[u]) - W[u][:, u]).tocsr()
    b = W[u][:, known] @ x[known] + c[u] * x[u]
    diag = deg[u] + c[u]
    sol, _ = cg(A, b, x0=x[u], rtol=1e-4, maxiter=500, M=sp.diags(1.0 / diag))
    x[u] = sol
    return x.reshape(h, w).clip(0, 1).astype(np.float32)


@dataclass
class _Context:
    key: str
    keys: torch.Tensor  # (m, d) patch features
    vals: torch.Tensor  # (m,) mask fraction per patch
    embedding: np.ndarray
    image: Image.Image | None = None  # kept for the model prior (``pipeline``)
    mask: np.ndarray | None = None


@dataclass
class _Query:
    shape: tuple[int, int]  # working image (H, W)
    grid: tuple[int, int]
    feats: torch.Tensor  # (n, d)
    colour: np.ndarray  # (gh, gw, 3) mean colour per patch, for the random walker's edges
    version: int = -1  # context version of the cached search
    used: list[str] = field(default_factory=list)
    sims: torch.Tensor | None = None  # (n, top_k) cached search over the context patches
    vals: torch.Tensor | None = None  # (n, top_k) their values
    pi: float = 0.5  # foreground fraction of the context patches voted over
    n_ctx: int = 0
    model_prior: torch.Tensor | None = None  # (n,) the pipeline's probability per patch, when it has one


class InteractiveSegmenter:
    """Segment images one after another from a growing context and the user's interactions.

    ``embed``: images -> L2-normalised vectors for choosing the nearest context images (default: the
    pixel embedder of :mod:`retrieval.embedders`). ``click_net``: a :class:`segicl.click_net.ClickNet`
    that turns the interactions and the context prior into a probability, the prior of the random
    walker (``click_rw``; or the answer itself); without interactions the context prior is the answer
    either way.
    """

    def __init__(self, config: InteractiveConfig | None = None,
                 embed: Callable[[Sequence[Image.Image]], np.ndarray] | None = None, cache_queries: int = 8,
                 pipeline=None, text: str = "", model_k: int = 5, click_net=None):
        self.config = config or InteractiveConfig()
        self.click_net = click_net
        self.pipeline, self.text, self.model_k = pipeline, text, model_k
        self.config.validate()
        if embed is None:
            from retrieval.embedders import get_embedder

            embed = get_embedder("pixel").embed
        self.embed = embed
        self._context: list[_Context] = []
        self._queries: OrderedDict[str, _Query] = OrderedDict()
        self._cache_queries = cache_queries
        self.version = 0

    @property
    def context_keys(self) -> list[str]:
        return [c.key for c in self._context]

    def _features(self, image: Image.Image) -> tuple[tuple[int, int], tuple[int, int], torch.Tensor, torch.Tensor]:
        cfg = self.config
        shape = working_shape(image.height, image.width, cfg.max_size, cfg.patch)
        grid = (shape[0] // cfg.patch, shape[1] // cfg.patch)
        x = _image(image, shape)
        return shape, grid, patch_features(x, grid, cfg.position, cfg.features)[0], x

    def add_context(self, image: Image.Image, mask: np.ndarray, key: str) -> None:
        """``image`` with its finished ``mask`` joins the context (replacing an earlier entry of ``key``)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"context {key!r}: mask {mask.shape} does not match the image {image.height}x{image.width}")
        _, grid, feats, _ = self._features(image)
        entry = _Context(key, feats, _patch_values(mask, grid), self.embed([image])[0],
                         image if self.pipeline is not None else None, mask if self.pipeline is not None else None)
        self._context = [c for c in self._context if c.key != key] + [entry]
        self.version += 1

    def remove_context(self, key: str) -> None:
        self._context = [c for c in self._context if c.key != key]
        self.version += 1

    def _query(self, image: Image.Image, key: str) -> _Query:
        q = self._queries.get(key)
        if q is None:
            shape, grid, feats, x = self._features(image)
            colour = torch.nn.functional.adaptive_avg_pool2d(x, grid)[0].permute(1, 2, 0).numpy()
            q = _Query(shape, grid, feats, colour)
            self._queries[key] = q
            while len(self._queries) > self._cache_queries:
                self._queries.popitem(last=False)
        self._queries.move_to_end(key)
        if q.version != self.version:  # search the context once per context version
            ctx = [c for c in self._context if c.key != key]
            if len(ctx) > self.config.max_context:
                e = self.embed([image])[0]
                order = np.argsort(-np.stack([c.embedding for c in ctx]) @ e, kind="stable")
                ctx = [ctx[i] for i in sorted(order[: self.config.max_context])]
            q.used = [c.key for c in ctx]
            q.sims = q.vals = None
            q.n_ctx = 0
            if ctx:
                from segicl.matching import _support_sample

                keys, vals = torch.cat([c.keys for c in ctx]), torch.cat([c.vals for c in ctx])
                if len(vals) > self.config.max_context_patches:
                    keep = _support_sample(vals, self.config.max_context_patches, True)
                    keys, vals = keys[keep], vals[keep]
                k = min(self.config.top_k, len(vals))
                q.sims, idx = _top_k_search(q.feats, keys, k, self.config.nprobe)
                q.vals = vals[idx]
                q.pi = float(vals.mean())
                q.n_ctx = len(vals)
            q.model_prior = self._model_prior(image, ctx, q.grid) if self.pipeline is not None and ctx else None
            q.version = self.version
        return q

    def predict(self, image: Image.Image, interactions: Interactions | None = None, key: str = "query"
                ) -> InteractiveOutput:
        """The probability of ``image`` (cached by ``key``: pass the same key for the same image)."""
        t0 = time.perf_counter()
        cfg = self.config
        interactions = interactions or Interactions()
        q = self._query(image, key)
        gh, gw = q.grid
        seeds = interactions.seeds(q.grid, (gh / image.height, gw / image.width), cfg.click_radius, cfg.box_margin)
        if interactions.boxes and not (seeds == 1).any():  # a box alone: its centre is foreground
            for y0, x0, y1, x1 in interactions.boxes:
                cy, cx, r = (y0 + y1) / 2, (x0 + x1) / 2, cfg.box_centre * min(y1 - y0 + 1, x1 - x0 + 1) / 2
                yy, xx = np.ogrid[:gh, :gw]
                disc = ((yy + 0.5) * image.height / gh - cy) ** 2 + ((xx + 0.5) * image.width / gw - cx) ** 2 <= r**2
                seeds[disc] = 1
        if q.n_ctx == 0 and (seeds == 1).any() and not (seeds == 2).any():  # no context: the border is background
            border = np.zeros_like(seeds, dtype=bool)
            border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
            seeds = np.where(border & (seeds == 0), 2, seeds).astype(np.int8)
        labelled = seeds.ravel() > 0
        if q.n_ctx == 0 and not labelled.any():
            prob = np.zeros((image.height, image.width), np.float32)
            return InteractiveOutput(prob, prob > 0.5, prob.copy(), time.perf_counter() - t0, [])
        from segicl.data.transforms import resize_prob

        if self.click_net is not None and not interactions.empty:
            ctx = None
            if q.n_ctx or q.model_prior is not None:  # the context prior alone: the network reads the marks itself
                none = torch.zeros(len(q.feats), dtype=torch.bool)
                ctx = self._vote(q, none, torch.zeros(len(q.feats), dtype=torch.int8)).view(q.grid).numpy()
            net_prob = self.click_net.predict(image, interactions, ctx)
            if cfg.click_rw:
                net_prob = random_walk(q.colour, seeds, resize_prob(net_prob, q.grid), cfg.prior_weight, cfg.beta)
            prob = resize_prob(net_prob, (image.height, image.width)).clip(0, 1)
            return InteractiveOutput(prob, prob > cfg.threshold, np.sqrt(prob * (1 - prob)).astype(np.float32),
                                     time.perf_counter() - t0, list(q.used))
        prior = self._vote(q, torch.from_numpy(labelled), torch.from_numpy(seeds.ravel()))
        grid_prob = prior.view(q.grid).numpy()
        if cfg.random_walk and labelled.any():  # without interactions the vote is the answer
            grid_prob = random_walk(q.colour, seeds, grid_prob, cfg.prior_weight, cfg.beta)
        else:  # the labelled points keep their label
            grid_prob = np.where(seeds == 1, 1.0, np.where(seeds == 2, 0.0, grid_prob)).astype(np.float32)
        prob = resize_prob(grid_prob, (image.height, image.width)).clip(0, 1)
        return InteractiveOutput(prob, prob > cfg.threshold, np.sqrt(prob * (1 - prob)).astype(np.float32),
                                 time.perf_counter() - t0, list(q.used))

    def _model_prior(self, image: Image.Image, ctx: list[_Context], grid: tuple[int, int]) -> torch.Tensor:
        """The SegICL pipeline's probability of ``image`` with the ``model_k`` context images nearest to it
        as supports (seed 0), area-pooled to the patch grid."""
        if len(ctx) > self.model_k:
            e = self.embed([image])[0]
            ctx = [ctx[i] for i in np.argsort(-np.stack([c.embedding for c in ctx]) @ e, kind="stable")[: self.model_k]]
        out = self.pipeline([image], text=self.text, supports=[[(c.image, c.mask) for c in ctx]],
                            generator=torch.Generator().manual_seed(0))
        prob = torch.from_numpy(np.asarray(out.probabilities[0], dtype=np.float32))[None, None]
        return torch.nn.functional.adaptive_avg_pool2d(prob, grid).flatten()

    def _vote(self, q: _Query, labelled: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """The prior: the balanced vote over the cached context top-k, and, when the interactions mark
        both labels, the balanced vote over the query's labelled patches alone, added in logit space
        with weight ``click_weight`` (a correction on one look changes every patch of that look)."""
        cfg = self.config
        logit = torch.zeros(len(q.feats))
        if q.model_prior is not None:  # the learned model read the context instead of the vote
            logit += torch.logit(q.model_prior.clamp(0.02, 0.98))
        elif q.sims is not None:
            logit += _balanced_logit(q.sims, q.vals, q.pi, cfg.scale)
        lab = (seeds[labelled] == 1).float()
        if len(lab) and 0 < lab.mean() < 1:
            s = q.feats @ q.feats[labelled].T  # (n_q, n_labelled)
            ts, ti = s.topk(min(cfg.top_k, s.shape[1]), dim=1)
            logit += cfg.click_weight * _balanced_logit(ts, lab[ti], float(lab.mean()), cfg.scale)
        return torch.sigmoid(logit)


def _balanced_logit(sims: torch.Tensor, vals: torch.Tensor, pi: float, scale: float) -> torch.Tensor:
    """log(fg / pi) - log(bg / (1 - pi)) of a softmax(scale x sims) vote over ``vals`` (segicl.matching.vote)."""
    fg = (torch.softmax(scale * sims, dim=-1) * vals).sum(-1).clamp(1e-4, 1 - 1e-4)
    pi = min(max(pi, 1e-3), 1 - 1e-3)
    return torch.log(fg / pi) - torch.log((1 - fg) / (1 - pi))
