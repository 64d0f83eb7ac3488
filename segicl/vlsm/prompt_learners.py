"""Context learners of TuneVLSeg (seed 002): learnable prompts for frozen VLSMs.

Every learner returns, per forward, a :class:`PromptContexts` with one tensor per prompted layer:
``text[j]`` (1 or B, n_ctx, D_text) and ``vision[j]`` (1, n_ctx, D_vision), j < depth. The towers
(:mod:`segicl.vlsm.towers`) insert ``text[0]`` after the SOS/CLS token embedding and replace the
context hidden states by ``text[j]`` at the input of layer j; ``vision[j]`` are appended after the
patch tokens (VPT-deep). Depth 1 with text only is CoOp.

=================  ======================================================================
CoOp               text context vectors (init "a photo of a" or Gaussian)
CoCoOp             CoOp + meta-net(image embedding) added to the first-layer context
VPT                deep visual prompts (VPT's xavier-uniform init)
MaPLe              text contexts; visual prompts = per-layer Linear(text context)
Shared-Separate    unified contexts (n, d_shared) -> Linear+LayerNorm to text and to vision
Shared-Attention   unified contexts (n, D_text + D_vision) -> TransformerEncoderLayer -> split
=================  ======================================================================

Shared-Attention fix: TuneVLSeg builds ``nn.TransformerEncoderLayer`` without ``batch_first`` and
feeds it (1, n_ctx, d), which PyTorch reads as (seq=1, batch=n_ctx): every context token only
attends to itself, so the "attention" is a per-token MLP. Here the layer is ``batch_first=True`` and
the n_ctx tokens attend to each other (tested). TuneVLSeg's Shared-Separate also projects the visual
prompts with the *textual* projection; here each modality has its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TEXT_LEARNERS = ("coop", "cocoop")
VISUAL_LEARNERS = ("vpt",)
MULTIMODAL_LEARNERS = ("maple", "shared_separate", "shared_attention")
LEARNERS = TEXT_LEARNERS + VISUAL_LEARNERS + MULTIMODAL_LEARNERS


@dataclass
class PromptContexts:
    """Per-layer prompts; None for a modality that is not prompted."""

    text: list[torch.Tensor] | None = None  # each (1 or B, n_ctx, D_text)
    vision: list[torch.Tensor] | None = None  # each (1, n_ctx, D_vision)


def _gaussian(depth: int, n_ctx: int, dim: int, std: float = 0.02) -> torch.Tensor:
    return torch.randn(depth, n_ctx, dim) * std


def _text_contexts(depth: int, n_ctx: int, dim: int, init_embeds: torch.Tensor | None) -> nn.Parameter:
    """(depth, n_ctx, dim): Gaussian, with layer 0 copied from ``init_embeds`` (k, dim) where given."""
    ctx = _gaussian(depth, n_ctx, dim)
    if init_embeds is not None:
        if init_embeds.ndim != 2 or init_embeds.shape[1] != dim:
            raise ValueError(f"init embeddings must be (k, {dim}), got {tuple(init_embeds.shape)}")
        k = min(n_ctx, init_embeds.shape[0])
        ctx[0, :k] = init_embeds[:k].detach().float()
    return nn.Parameter(ctx)


class PromptLearner(nn.Module):
    """Base class: ``forward(image_embeds=None) -> PromptContexts``."""

    name = "base"
    needs_image_embedding = False
    prompts_text = False
    prompts_vision = False

    def __init__(self, n_ctx: int, depth: int):
        super().__init__()
        if n_ctx < 1 or depth < 1:
            raise ValueError(f"n_ctx and depth must be >= 1, got n_ctx={n_ctx}, depth={depth}")
        self.n_ctx, self.depth = n_ctx, depth


class CoOpLearner(PromptLearner):
    """CoOp (depth 1) / deep textual prompts (depth > 1)."""

    name = "coop"
    prompts_text = True

    def __init__(self, text_dim: int, n_ctx: int = 4, depth: int = 1, init_embeds: torch.Tensor | None = None):
        super().__init__(n_ctx, depth)
        self.ctx = _text_contexts(depth, n_ctx, text_dim, init_embeds)

    def forward(self, image_embeds: torch.Tensor | None = None) -> PromptContexts:
        return PromptContexts(text=[self.ctx[j][None] for j in range(self.depth)])


class CoCoOpLearner(CoOpLearner):
    """CoCoOp: a meta-net maps the (L2-normalised) image embedding to a shift of the first context.

    Args:
        text_dim: text hidden width.
        image_dim: image embedding width (projected CLIP image embedding).
        hidden_dim: meta-net bottleneck (CoCoOp uses image_dim // 16).
    """

    name = "cocoop"
    needs_image_embedding = True

    def __init__(
        self,
        text_dim: int,
        image_dim: int,
        n_ctx: int = 4,
        depth: int = 1,
        init_embeds: torch.Tensor | None = None,
        hidden_dim: int | None = None,
    ):
        super().__init__(text_dim, n_ctx, depth, init_embeds)
        hidden = hidden_dim or max(image_dim // 16, 4)
        self.meta_net = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, text_dim))

    def forward(self, image_embeds: torch.Tensor | None = None) -> PromptContexts:
        if image_embeds is None:
            raise ValueError("CoCoOp needs the image embedding (B, P)")
        bias = self.meta_net(F.normalize(image_embeds, dim=-1))  # (B, D_text)
        first = self.ctx[0][None] + bias[:, None, :]  # (B, n_ctx, D_text)
        return PromptContexts(text=[first] + [self.ctx[j][None] for j in range(1, self.depth)])


class VPTLearner(PromptLearner):
    """VPT-deep: visual prompts for layers [0, depth), xavier-uniform init as in VPT."""

    name = "vpt"
    prompts_vision = True

    def __init__(self, vision_dim: int, n_ctx: int = 4, depth: int = 1, patch_size: int = 16):
        super().__init__(n_ctx, depth)
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + vision_dim))
        self.ctx = nn.Parameter(torch.empty(depth, n_ctx, vision_dim).uniform_(-bound, bound))

    def forward(self, image_embeds: torch.Tensor | None = None) -> PromptContexts:
        return PromptContexts(vision=[self.ctx[j][None] for j in range(self.depth)])


class MaPLeLearner(PromptLearner):
    """MaPLe: text contexts per layer; visual prompts are a per-layer linear map of them."""

    name = "maple"
    prompts_text = prompts_vision = True

    def __init__(
        self, text_dim: int, vision_dim: int, n_ctx: int = 4, depth: int = 1, init_embeds: torch.Tensor | None = None
    ):
        super().__init__(n_ctx, depth)
        self.ctx = _text_contexts(depth, n_ctx, text_dim, init_embeds)
        self.proj = nn.ModuleList(nn.Linear(text_dim, vision_dim) for _ in range(depth))

    def forward(self, image_embeds: torch.Tensor | None = None) -> PromptContexts:
        text = [self.ctx[j][None] for j in range(self.depth)]
        return PromptContexts(text=text, vision=[self.proj[j](t) for j, t in enumerate(text)])


class SharedSeparateLearner(PromptLearner):
    """Unified prompts (n, d_shared) per layer, mapped by Linear+LayerNorm to each modality.

    ``shared_projection`` uses one projection per modality for all depths (TuneVLSeg's default).
    """

    name = "shared_separate"
    prompts_text = prompts_vision = True

    def __init__(
        self,
        text_dim: int,
        vision_dim: int,
        n_ctx: int = 4,
        depth: int = 1,
        shared_dim: int = 64,
        shared_projection: bool = True,
        proj_norm: bool = True,
    ):
        super().__init__(n_ctx, depth)
        self.ctx = nn.Parameter(_gaussian(depth, n_ctx, shared_dim))

        def proj(out: int) -> nn.Module:
            return nn.Sequential(nn.Linear(shared_dim, out), nn.LayerNorm(out) if proj_norm else nn.Identity())

        copies = 1 if shared_projection else depth
        self.text_proj = nn.ModuleList(proj(text_dim) for _ in range(copies))
        self.vision_proj = nn.ModuleList(proj(vision_dim) for _ in range(copies))

    def forward(self, image_embeds: torch.Tensor | None = None) -> PromptContexts:
        k = lambda j: min(j, len(self.text_proj) - 1)  # noqa: E731
        text = [self.text_proj[k(j)](self.ctx[j])[None] for j in range(self.depth)]
        vision = [self.vision_proj[k(j)](self.ctx[j])[None] for j in range(self.depth)]
        return PromptContexts(text=text, vision=vision)


class SharedAttentionLearner(PromptLearner):
    """Unified prompts (n, D_text + D_vision) through a transformer layer, split into the two modalities.

    The layer is ``batch_first=True`` with input (1, n_ctx, d), so the context tokens attend to each
    other (the original's layout made each token attend only to itself).
    """

    name = "shared_attention"
    prompts_text = prompts_vision = True

    def __init__(
        self,
        text_dim: int,
        vision_dim: int,
        n_ctx: int = 4,
        depth: int = 1,
        nhead: int = 4,
        dim_feedforward: int | None = None,
        dropout: float = 0.0,
        norm_first: bool = True,
        shared_projection: bool = True,
    ):
        super().__init__(n_ctx, depth)
        d = text_dim + vision_dim
        if d % nhead:
            raise ValueError(f"nhead={nhead} must divide text_dim + vision_dim = {d}")
        self.text_dim = text_dim
        self.ctx = nn.Parameter(_gaussian(depth, n_ctx, d))
        copies = 1 if shared_projection else depth
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model=d, nhead=nhead, dim_feedforward=dim_feedforward or 2 * d, dropout=dropout,
                batch_first=True, norm_first=norm_first,
            )
            for _ in range(copies)
        )

    def mix(self, j: int) -> torch.Tensor:
        """Layer-j unified prompts after self-attention among the context tokens: (1, n_ctx, d)."""
        return self.layers[min(j, len(self.layers) - 1)](self.ctx[j][None])

    def forward(self, image_embeds: torch.Tensor | None = None) -> PromptContexts:
        mixed = [self.mix(j) for j in range(self.depth)]
        return PromptContexts(
            text=[m[..., : self.text_dim] for m in mixed], vision=[m[..., self.text_dim :] for m in mixed]
        )


def build_learner(
    name: str,
    *,
    text_dim: int,
    vision_dim: int | None,
    image_dim: int,
    patch_size: int,
    init_embeds: torch.Tensor | None,
    cfg: dict,
) -> PromptLearner:
    """Construct a learner by name from a ``prompt`` config block.

    Args:
        name: one of :data:`LEARNERS`.
        text_dim / vision_dim / image_dim: widths of the text tower, the ViT (None for a CNN) and the
            projected image embedding.
        patch_size: ViT patch size (VPT init).
        init_embeds: (k, text_dim) token embeddings of ``cfg["ctx_init"]`` or None (Gaussian).
        cfg: ``n_ctx``, ``depth`` and the learner's own keys (``shared_dim``, ``nhead``, ...).

    Raises:
        ValueError: unknown learner, a visual learner on a model without ViT, or ``ctx_init`` for a
            learner whose contexts do not live in the text embedding space.
    """
    if name not in LEARNERS:
        raise ValueError(f"unknown prompt learner {name!r}; choose from {LEARNERS}")
    n_ctx, depth = int(cfg.get("n_ctx", 4)), int(cfg.get("depth", 1))
    if name not in TEXT_LEARNERS and vision_dim is None:
        raise ValueError(f"{name} prompts the vision encoder and needs a ViT; this model only supports {TEXT_LEARNERS}")
    if init_embeds is not None and name not in ("coop", "cocoop", "maple"):
        raise ValueError(f"ctx_init is only meaningful for coop, cocoop and maple, not {name} (set ctx_init: null)")
    if name == "coop":
        return CoOpLearner(text_dim, n_ctx, depth, init_embeds)
    if name == "cocoop":
        return CoCoOpLearner(text_dim, image_dim, n_ctx, depth, init_embeds, cfg.get("meta_hidden"))
    if name == "vpt":
        return VPTLearner(vision_dim, n_ctx, depth, patch_size)
    if name == "maple":
        return MaPLeLearner(text_dim, vision_dim, n_ctx, depth, init_embeds)
    if name == "shared_separate":
        return SharedSeparateLearner(
            text_dim, vision_dim, n_ctx, depth, int(cfg.get("shared_dim", 64)),
            bool(cfg.get("shared_projection", True)), bool(cfg.get("proj_norm", True)),
        )
    return SharedAttentionLearner(
        text_dim, vision_dim, n_ctx, depth, int(cfg.get("nhead", 4)), cfg.get("dim_feedforward"),
        float(cfg.get("dropout", 0.0)), bool(cfg.get("norm_first", True)), bool(cfg.get("shared_projection", True)),
    )
