"""The condition encoder (the paper's "shared teacher", section 3.2).

A binary mask (B, 1, M, M) is cut into P x P patches; a 4-layer MLP maps each flattened patch (plus a
learned position embedding, so a token knows where its patch lies) to a condition token of width d_c.
The result C (B, N, d_c), N = (M / P)^2, is what the diffusion decoder cross-attends to. Stage 1
trains it with the decoder; stage 2 freezes it and regresses its output with the multimodal
encoder (paper eq. 5). The output is layer-normalised (no affine), so C has unit scale per token and
the stage-2 MSE is comparable across presets.
"""

from __future__ import annotations

import torch
from torch import nn

from segicl.config import SegICLConfig


class ConditionEncoder(nn.Module):
    def __init__(self, mask_size: int = 64, patch_size: int = 8, dim: int = 64, hidden: int = 256, layers: int = 4):
        super().__init__()
        if layers < 2:
            raise ValueError("the condition encoder needs at least 2 layers")
        if mask_size % patch_size:
            raise ValueError(f"mask_size {mask_size} is not a multiple of patch_size {patch_size}")
        self.mask_size, self.patch_size, self.dim = mask_size, patch_size, dim
        self.num_tokens = (mask_size // patch_size) ** 2
        self.unfold = nn.Unfold(kernel_size=patch_size, stride=patch_size)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, hidden))
        nn.init.normal_(self.pos, std=0.02)
        self.inp = nn.Linear(patch_size * patch_size, hidden)
        blocks: list[nn.Module] = []
        for _ in range(layers - 2):
            blocks += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.mlp = nn.Sequential(*blocks, nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)

    @classmethod
    def from_config(cls, cfg: SegICLConfig) -> ConditionEncoder:
        c = cfg.condition
        return cls(cfg.mask_size, c.patch_size, c.dim, c.hidden, c.layers)

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        """(B, 1, M, M) masks in {0, 1} (or soft) -> (B, N, d_c) condition tokens."""
        if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[-1] != self.mask_size or masks.shape[-2] != self.mask_size:
            raise ValueError(f"expected masks of shape (B, 1, {self.mask_size}, {self.mask_size}), got {tuple(masks.shape)}")
        patches = self.unfold(masks.float() * 2 - 1).transpose(1, 2)  # (B, N, P*P) in [-1, 1]
        return self.norm(self.mlp(self.inp(patches) + self.pos))
