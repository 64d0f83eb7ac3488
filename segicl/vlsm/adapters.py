"""VLSM-Adapter (seed 003): shallow and dense adapters for CLIPSeg-style VLSMs, in V / VL / VLC placements.

Adapter block (paper eq. 1, vlsm-adapter code): ``f' = f + relu(W2 relu(W1 f))``.

* Dense (DA, bottleneck 64): an adapter on the output of the attention and of the MLP sub-layer,
  just before each residual add, in the first ``max(extract_layers)`` layers (9 for CLIPSeg: the
  paper's "up to max(L_t) = 9 attention layers", and the reference code's count) of both encoders.
  Installed with forward hooks on the tower's sub-layers, so the library's layer code runs
  unchanged. (CLIPSeg's extract indices are 0-based, so the decoder also reads block 9's output,
  which, as in the reference code, has no adapter of its own.)
* Shallow (SA, bottleneck 512): an adapter on each vision skip connection the decoder reads
  (blocks 3/6/9); on the text side, an adapter on the pooled (EOS / CLS) hidden state of the same
  blocks whose output is added to the conditional embedding.
* C (VLC): an adapter (bottleneck 256, as in the reference code) on the conditional embedding.

Departure from the reference code, on purpose: its shallow text adapter adds the full adapter output
``h + delta(h)`` to the conditional embedding, i.e. it also adds the raw layer-3/6/9 hidden states,
which changes the pretrained model's prediction before any training. Here only the learned branch
``delta(h)`` is added (``Adapter(residual=False)``, projecting to the conditioning width, which
also makes it work when text width != projection width as in BiomedCLIP). Parameter counts are
unchanged: at the real CLIPSeg size DA-VLC has 3,237,376 trainable parameters and SA-VLC 4,201,984
(paper: "3M" and "4.2M"); see :func:`clipseg_adapter_parameter_count`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PLACEMENTS = ("v", "vl", "vlc")
KINDS = ("shallow", "dense")


class Adapter(nn.Module):
    """Bottleneck adapter ``x + act(fc2(act(fc1(x))))`` (``residual=False``: the branch alone).

    Args:
        in_dim: input width D.
        bottleneck: hidden width D'.
        out_dim: output width (default ``in_dim``; must equal it when ``residual``).
        residual: add the input back.

    Shapes: (..., in_dim) -> (..., out_dim).
    """

    def __init__(self, in_dim: int, bottleneck: int, out_dim: int | None = None, residual: bool = True):
        super().__init__()
        out_dim = out_dim or in_dim
        if residual and out_dim != in_dim:
            raise ValueError(f"a residual adapter needs out_dim == in_dim, got {in_dim} -> {out_dim}")
        self.residual = residual
        self.fc1 = nn.Linear(in_dim, bottleneck)
        self.fc2 = nn.Linear(bottleneck, out_dim)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc2(self.act(self.fc1(x))))
        return x + h if self.residual else h


class _AdapterHook:
    """Forward hook replacing a sub-layer's output ``y`` (or ``y[0]`` of a tuple) by ``adapter(y)``."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def __call__(self, module: nn.Module, inputs: tuple, output):
        if isinstance(output, tuple):
            return (self.adapter(output[0]), *output[1:])
        return self.adapter(output)


class VLSMAdapters(nn.Module):
    """All adapters of one CLIPSeg-style model for a (kind, placement).

    Args:
        kind: "shallow" or "dense".
        placement: "v", "vl" or "vlc".
        vision_dim / text_dim / cond_dim: widths of the ViT, the text tower and the conditional embedding.
        extract_layers: 0-based vision blocks the decoder reads.
        text_layers: number of text-tower layers (dense text adapters go up to ``max(extract_layers)``).
        dense_bottleneck / shallow_bottleneck / cond_bottleneck: 64 / 512 / 256 in the paper's code.
    """

    def __init__(
        self,
        kind: str,
        placement: str,
        *,
        vision_dim: int,
        text_dim: int,
        cond_dim: int,
        extract_layers: Sequence[int],
        text_layers: int,
        dense_bottleneck: int = 64,
        shallow_bottleneck: int = 512,
        cond_bottleneck: int = 256,
    ):
        super().__init__()
        if kind not in KINDS or placement not in PLACEMENTS:
            raise ValueError(f"adapter kind must be in {KINDS} and placement in {PLACEMENTS}, got {kind}, {placement}")
        self.kind, self.placement = kind, placement
        self.extract_layers = list(extract_layers)
        depth = max(max(self.extract_layers), 1)
        if kind == "dense":
            if depth > text_layers and "l" in placement:
                raise ValueError(f"dense text adapters need {depth} text layers, the tower has {text_layers}")
            self.vision_dense = nn.ModuleList(
                nn.ModuleList([Adapter(vision_dim, dense_bottleneck), Adapter(vision_dim, dense_bottleneck)])
                for _ in range(depth)
            )
            self.text_dense = (
                nn.ModuleList(
                    nn.ModuleList([Adapter(text_dim, dense_bottleneck), Adapter(text_dim, dense_bottleneck)])
                    for _ in range(depth)
                )
                if "l" in placement
                else None
            )
        else:
            self.vision_shallow = nn.ModuleList(Adapter(vision_dim, shallow_bottleneck) for _ in self.extract_layers)
            self.text_shallow = (
                nn.ModuleList(
                    Adapter(text_dim, shallow_bottleneck, cond_dim, residual=False) for _ in self.extract_layers
                )
                if "l" in placement
                else None
            )
        self.cond = Adapter(cond_dim, cond_bottleneck) if placement == "vlc" else None
        self._handles: list = []

    def attach(self, vision_tower: nn.Module, text_tower: nn.Module) -> None:
        """Install the dense adapters as forward hooks on the towers' sub-layers (idempotent)."""
        self.detach()
        if self.kind != "dense":
            return
        pairs = [(vision_tower, self.vision_dense)]
        if self.text_dense is not None:
            pairs.append((text_tower, self.text_dense))
        for tower, adapters in pairs:
            for i, (a_attn, a_mlp) in enumerate(adapters):
                attn, mlp = tower.sublayers(i)
                self._handles.append(attn.register_forward_hook(_AdapterHook(a_attn)))
                self._handles.append(mlp.register_forward_hook(_AdapterHook(a_mlp)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def adapt_activations(self, activations: list[torch.Tensor]) -> list[torch.Tensor]:
        """Shallow vision adapters on the decoder's skip connections (identity for dense)."""
        if self.kind != "shallow":
            return activations
        return [a(x) for a, x in zip(self.vision_shallow, activations, strict=True)]

    def adapt_condition(self, cond: torch.Tensor, text_hidden: list[torch.Tensor], pool_index: torch.Tensor) -> torch.Tensor:
        """Conditional embedding (B, P): C adapter, then + shallow text adapters on layers 3/6/9.

        Args:
            cond: (B, P) projected sentence embedding.
            text_hidden: per-block (B, L, D_text) text hidden states (block i's output at i).
            pool_index: (B,) token index pooled by the tower (EOS for CLIP, 0 for BERT).
        """
        if self.cond is not None:
            cond = self.cond(cond)
        if self.kind == "shallow" and self.text_shallow is not None:
            rows = torch.arange(cond.shape[0], device=cond.device)
            for layer, adapter in zip(self.extract_layers, self.text_shallow, strict=True):
                cond = cond + adapter(text_hidden[layer][rows, pool_index])
        return cond


def clipseg_adapter_parameter_count(kind: str, placement: str, **dims) -> int:
    """Trainable parameters of :class:`VLSMAdapters` for the real CLIPSeg (rd64-refined) by default.

    Built on the meta device, so no memory or weights are needed. ``dims`` override the defaults
    (vision_dim=768, text_dim=512, cond_dim=512, extract_layers=(3, 6, 9), text_layers=12).
    """
    kwargs = dict(vision_dim=768, text_dim=512, cond_dim=512, extract_layers=(3, 6, 9), text_layers=12)
    kwargs.update(dims)
    with torch.device("meta"):
        adapters = VLSMAdapters(kind, placement, **kwargs)
    return sum(p.numel() for p in adapters.parameters())
