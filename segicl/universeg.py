"""A UniverSeg-style in-context segmenter (Butoi et al., ICCV 2023), written here as a comparator.

The strongest published in-context design without a language model: a U-Net whose every block is a
*CrossBlock*. With query features ``q`` (B, C, H, W) and support features ``s_i`` (B, K, C', H, W),
the cross-convolution ``z_i = conv([q, s_i])`` is computed for every support, the query moves on
as ``conv(mean_i z_i)`` and every support as ``conv(z_i)``; so the query reads its supports at
every scale, and the result does not depend on the supports' order. Supports enter as image +
mask (4 channels), the query as the image (3 channels); the output is the query's mask logits.

Differences from the paper, on purpose: RGB inputs (the paper is greyscale), a smaller width and a
64 px working size (the project's CPU scale), BatchNorm-free (GroupNorm) blocks, and training on
the project's real + pseudo tasks (training/universeg_task.py) instead of MegaMedical. Saved as
``config.json`` + ``model.safetensors`` (+ manifest with sha256), loaded only through safetensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class UniverSegConfig:
    size: int = 64  # working side in pixels
    channels: tuple[int, ...] = (32, 32, 32, 32)  # per level (the paper: 64 at every level, 128 px)
    k_max: int = 8

    def validate(self) -> UniverSegConfig:
        if self.size % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"size {self.size} must be divisible by 2^(levels - 1)")
        return self


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.GELU())


class CrossBlock(nn.Module):
    def __init__(self, cq: int, cs: int, cout: int):
        super().__init__()
        self.cross = _conv(cq + cs, cout)
        self.query = _conv(cout, cout)
        self.support = _conv(cout, cout)

    def forward(self, q: torch.Tensor, s: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``w`` (B, K, 1, 1, 1): 1 / k for an item's real supports, 0 for padding (the mean over its supports)."""
        b, k = s.shape[:2]
        x = torch.cat([q.unsqueeze(1).expand(-1, k, -1, -1, -1), s], 2).flatten(0, 1)
        z = self.cross(x).view(b, k, -1, *q.shape[-2:])
        q = self.query((z * w).sum(1))
        s = self.support(z.flatten(0, 1)).view(b, k, -1, *q.shape[-2:])
        return q, s


class UniverSeg(nn.Module):
    def __init__(self, cfg: UniverSegConfig | None = None):
        super().__init__()
        self.cfg = cfg = (cfg or UniverSegConfig()).validate()
        ch = cfg.channels
        self.down = nn.ModuleList()
        cq, cs = 3, 4
        for c in ch:
            self.down.append(CrossBlock(cq, cs, c))
            cq = cs = c
        self.up = nn.ModuleList(CrossBlock(ch[i + 1] + ch[i], ch[i + 1] + ch[i], ch[i]) for i in reversed(range(len(ch) - 1)))
        self.head = nn.Conv2d(ch[0], 1, 1)

    def forward(self, query: torch.Tensor, support_images: torch.Tensor, support_masks: torch.Tensor,
                num_supports: list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """query (B, 3, S, S) in [-1, 1], supports (B, K, 3, S, S) and masks (B, K, 1, S, S), padded beyond
        each item's ``num_supports`` (default: all K; every item needs k >= 1) -> logits (B, 1, S, S)."""
        b, kk = support_images.shape[:2]
        ks = [kk] * b if num_supports is None else [int(k) for k in num_supports]
        if kk < 1 or min(ks) < 1 or max(ks) > kk:
            raise ValueError(f"UniverSeg needs 1..{kk} supports per item, got {ks}")
        w = torch.zeros(b, kk, 1, 1, 1, device=query.device, dtype=query.dtype)
        for i, k in enumerate(ks):
            w[i, :k] = 1.0 / k
        q, s = query, torch.cat([support_images, support_masks.float() * 2 - 1], 2)
        skips = []
        for i, block in enumerate(self.down):
            q, s = block(q, s, w)
            if i < len(self.down) - 1:
                skips.append((q, s))
                b, k = s.shape[:2]
                q = F.max_pool2d(q, 2)
                s = F.max_pool2d(s.flatten(0, 1), 2).view(b, k, -1, *q.shape[-2:])
        for block, (sq, ss) in zip(self.up, reversed(skips)):
            b, k = s.shape[:2]
            q = torch.cat([F.interpolate(q, size=sq.shape[-2:], mode="bilinear", align_corners=False), sq], 1)
            s = F.interpolate(s.flatten(0, 1), size=sq.shape[-2:], mode="bilinear", align_corners=False)
            s = torch.cat([s.view(b, k, -1, *sq.shape[-2:]), ss], 2)
            q, s = block(q, s, w)
        return self.head(q)

    def save_pretrained(self, path: str | Path) -> Path:
        from segicl.io import save_safetensors_dir

        return save_safetensors_dir(path, "segicl-universeg/1", asdict(self.cfg), self.state_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path) -> UniverSeg:
        from segicl.io import load_safetensors_dir

        cfg, state = load_safetensors_dir(path, "segicl-universeg/1")
        model = cls(UniverSegConfig(**cfg))
        model.load_state_dict(state)
        return model.eval()
