"""Encoder towers with a common, layer-by-layer interface.

The VLSMs need more of their encoders than a plain ``forward``: deep prompts replace tokens between
layers (VPT, MaPLe, ...), dense adapters act before each residual add, and the decoder reads
intermediate layers. Each tower below is a view (not a registered sub-module: the model owns the library modules, so
their state-dict layout stays the library's) over one library module, and exposes:

Vision (ViT) towers ``HFCLIPVisionTower`` (transformers CLIPSeg), ``TimmViTTower`` (BiomedCLIP):
    ``embed(pixels) -> (B, 1+N, D)``, ``blocks``, ``run_block(i, x)``, ``pool(x) -> (B, P)`` and
    ``sublayers(i) -> (attn, mlp)`` (the modules whose outputs feed the two residual adds).
Text towers ``HFCLIPTextTower`` (CLIPSeg), ``HFBertTextTower`` (BiomedCLIP, open_clip
``HFTextEncoder``), ``OpenCLIPTextTower`` (CRIS, open_clip ``CLIP``):
    ``embed_tokens(ids) -> (B, L, D)``, ``embed_positions(x)``, ``block_mask(attn_mask)``,
    ``run_block(i, x, mask)``, ``pool(x, eos_index) -> (B, D)``, ``project(pooled) -> (B, P)``,
    ``sublayers(i)``.

:func:`encode_vision` and :func:`encode_text` run those loops with optional deep prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _neg_inf(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def causal_padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype, causal: bool) -> torch.Tensor:
    """(B, L) {0, 1} key mask -> (B, 1, L, L) additive mask (optionally causal)."""
    b, length = attention_mask.shape
    allowed = attention_mask.bool()[:, None, None, :].expand(b, 1, length, length)
    if causal:
        tri = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = allowed & tri
    # A query row with no allowed key (padding query under the causal mask) would give NaN: let it
    # attend to itself; its output is never read.
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=attention_mask.device)
    return mask.masked_fill(~allowed, _neg_inf(dtype))


# ----------------------------------------------------------------------------------------- vision
class HFCLIPVisionTower:
    """The ViT of a transformers ``CLIPSegModel`` (``clip.vision_model`` + ``clip.visual_projection``)."""

    def __init__(self, clip: nn.Module):
        self.model = clip.vision_model
        self.projection = clip.visual_projection
        cfg = clip.config.vision_config
        self.width, self.num_layers, self.patch_size = cfg.hidden_size, cfg.num_hidden_layers, cfg.patch_size
        self.proj_dim = clip.config.projection_dim

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised -> (B, 1 + H/p * W/p, D) (CLS first; positions interpolated)."""
        return self.model.pre_layrnorm(self.model.embeddings(pixels, interpolate_pos_encoding=True))

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x, None)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden state (B, T, D) -> projected CLS embedding (B, P)."""
        return self.projection(self.model.post_layernorm(x[:, 0]))

    def sublayers(self, i: int) -> tuple[nn.Module, nn.Module]:
        layer = self.blocks[i]
        return layer.self_attn, layer.mlp


class TimmVisual(nn.Module):
    """A timm VisionTransformer trunk + linear projection head, laid out like open_clip's ``TimmModel``.

    State-dict keys (``trunk.*``, ``head.proj.weight``) match BiomedCLIP's ``visual.*`` so its
    open_clip checkpoint loads as is. ``trunk_kwargs`` override the timm architecture (tiny presets).
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224",
        embed_dim: int = 512,
        image_size: int = 224,
        trunk_kwargs: dict | None = None,
        proj_bias: bool = False,
    ):
        super().__init__()
        import timm

        kwargs = dict(trunk_kwargs or {})
        kwargs.setdefault("img_size", image_size)
        self.trunk = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
        self.head = nn.Sequential(OrderedDict(drop=nn.Dropout(0.0), proj=nn.Linear(self.trunk.num_features, embed_dim, bias=proj_bias)))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim) projected CLS embedding."""
        return self.head(self.trunk.forward_head(self.trunk.forward_features(pixels), pre_logits=True))


class TimmViTTower:
    """Layer-by-layer view of a :class:`TimmVisual` (BiomedCLIP's ViT-B/16)."""

    def __init__(self, visual: TimmVisual):
        self.visual = visual
        self.trunk = visual.trunk
        self.head = visual.head
        self.width = self.trunk.num_features
        self.num_layers = len(self.trunk.blocks)
        self.patch_size = self.trunk.patch_embed.patch_size[0]
        self.proj_dim = visual.head.proj.out_features

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        return t.norm_pre(t.patch_drop(t._pos_embed(t.patch_embed(pixels))))

    def run_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        return self.head(t.fc_norm(t.norm(x)[:, 0]))

    def sublayers(self, i: int) -> tuple[nn.Module, nn.Module]:
        block = self.blocks[i]
        return block.attn, block.mlp


# ------------------------------------------------------------------------------------------- text
class HFCLIPTextTower:
    """The causal text transformer of a transformers ``CLIPSegModel``; pools the first EOS token."""

    causal = True

    def __init__(self, clip: nn.Module):
        self.model = clip.text_model
        self.projection = clip.text_projection
        cfg = clip.config.text_config
        self.width, self.num_layers = cfg.hidden_size, cfg.num_hidden_layers
        self.max_length = cfg.max_position_embeddings
        self.proj_dim = clip.config.projection_dim

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embeddings.token_embedding(ids)

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        pos = self.model.embeddings.position_embedding.weight[: x.shape[1]]
        return x + pos

    def block_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return causal_padding_mask(attention_mask, dtype, causal=True)

    def run_block(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x, mask)

    def pool(self, x: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        x = self.model.final_layer_norm(x)
        return x[torch.arange(x.shape[0], device=x.device), eos_index]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled)

    def sublayers(self, i: int) -> tuple[nn.Module, nn.Module]:
        layer = self.blocks[i]
        return layer.self_attn, layer.mlp


class HFBertTextTower:
    """open_clip ``HFTextEncoder`` around a transformers BERT (BiomedCLIP's PubMedBERT); CLS pooling.

    BERT is post-LN: the dense adapters sit on ``attention.output.dense`` and ``output.dense``,
    i.e. before each residual add + LayerNorm (Houlsby's placement).
    """

    causal = False

    def __init__(self, encoder: nn.Module):
        self.encoder = encoder  # open_clip.hf_model.HFTextEncoder
        bert = encoder.transformer
        self.width = bert.config.hidden_size
        self.num_layers = bert.config.num_hidden_layers
        self.max_length = bert.config.max_position_embeddings
        self.proj_dim = encoder.output_dim

    @property
    def blocks(self) -> nn.ModuleList:
        return self.encoder.transformer.encoder.layer

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder.transformer.embeddings.word_embeddings(ids)

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.transformer.embeddings(inputs_embeds=x)

    def block_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return causal_padding_mask(attention_mask, dtype, causal=False)

    def run_block(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.blocks[i](x, mask)
        return out[0] if isinstance(out, tuple) else out

    def pool(self, x: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        return x[:, 0]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.encoder.proj(pooled)

    def sublayers(self, i: int) -> tuple[nn.Module, nn.Module]:
        layer = self.blocks[i]
        return layer.attention.output.dense, layer.output.dense


class OpenCLIPTextTower:
    """The text transformer of an open_clip ``CLIP`` (OpenAI layout, as CRIS uses it)."""

    causal = True

    def __init__(self, clip: nn.Module):
        self.clip = clip
        self.width = clip.transformer.width
        self.num_layers = clip.transformer.layers
        self.max_length = clip.positional_embedding.shape[0]
        tp = clip.text_projection
        self.proj_dim = tp.out_features if isinstance(tp, nn.Linear) else tp.shape[1]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.clip.transformer.resblocks

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.token_embedding(ids)

    def embed_positions(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.clip.positional_embedding[: x.shape[1]]

    def block_mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        length = attention_mask.shape[1]
        mask = torch.zeros(length, length, dtype=dtype, device=attention_mask.device)
        return mask.masked_fill(torch.ones_like(mask, dtype=torch.bool).triu(1), float("-inf"))

    def run_block(self, i: int, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.blocks[i](x, attn_mask=mask)

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.clip.ln_final(x)

    def pool(self, x: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        x = self.clip.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), eos_index]

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        tp = self.clip.text_projection
        return tp(pooled) if isinstance(tp, nn.Linear) else pooled @ tp

    def sublayers(self, i: int) -> tuple[nn.Module, nn.Module]:
        block = self.blocks[i]
        return block.attn, block.mlp


# ------------------------------------------------------------------------------------------ loops
def encode_vision(
    tower: nn.Module,
    pixels: torch.Tensor,
    extract_layers: Sequence[int],
    prompts: Sequence[torch.Tensor] | None = None,
    run_all_layers: bool = True,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Run a ViT tower, appending deep visual prompts (VPT-deep layout) after the patch tokens.

    Args:
        tower: a vision tower (interface in the module docstring).
        pixels: (B, 3, H, W) normalised for the tower.
        extract_layers: 0-based indices of the blocks whose outputs are returned (transformers'
            CLIPSeg convention, ``hidden_states[i + 1]``: CIDAS's [3, 6, 9] are the outputs of the
            4th, 7th and 10th layers).
        prompts: ``prompts[j]`` (1 or B, n, D) replaces the prompt tokens at the input of layer j,
            for j < len(prompts); later layers carry the prompt outputs along.
        run_all_layers: also run the layers after the deepest extracted one and pool (needed for the
            image embedding); otherwise stop early and return ``None`` as the embedding.

    Returns:
        activations: one (B, 1 + N + n, D) tensor per extract layer (prompt tokens last).
        pooled: (B, P) projected image embedding, or None.
    """
    x = tower.embed(pixels)
    b, t = x.shape[0], x.shape[1]
    wanted = set(extract_layers)
    last = tower.num_layers if run_all_layers else max(extract_layers) + 1
    acts: dict[int, torch.Tensor] = {}
    for i in range(last):
        if prompts is not None and i < len(prompts):
            p = prompts[i].to(x.dtype).expand(b, -1, -1)
            x = torch.cat([x[:, :t], p], dim=1)
        x = tower.run_block(i, x)
        if i in wanted:
            acts[i] = x
    pooled = tower.pool(x) if run_all_layers else None
    return [acts[k] for k in extract_layers], pooled


def encode_text(
    tower: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompts: Sequence[torch.Tensor] | None = None,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Run a text tower with deep textual prompts inserted after the first (SOS / CLS) token.

    Args:
        tower: a text tower.
        input_ids: (B, L) token ids.
        attention_mask: (B, L) {0, 1}.
        prompts: ``prompts[0]`` (1 or B, n, D) are context vectors in token-embedding space (CoOp);
            ``prompts[j]`` for j >= 1 replace the n context hidden states at the input of layer j.
        eos_token_id: id whose first occurrence is pooled (CLIP); None for CLS pooling (BERT).

    Returns:
        cond: (B, P) projected sentence embedding.
        hidden: per block (B, L + n, D) outputs (before the final norm); ``hidden[i]`` is block i's.
        last: (B, L + n, D) last layer after the tower's final norm, when it has one (CRIS words).
        key_mask: (B, L + n) {0, 1} mask of the returned tokens (context tokens are valid).
    """
    b = input_ids.shape[0]
    x = tower.embed_tokens(input_ids)
    n = 0
    if prompts:
        ctx = prompts[0].to(x.dtype).expand(b, -1, -1)
        n = ctx.shape[1]
        x = torch.cat([x[:, :1], ctx, x[:, 1:]], dim=1)
        ones = attention_mask.new_ones(b, n)
        attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
    if x.shape[1] > tower.max_length:
        raise ValueError(f"text of {x.shape[1]} tokens (with {n} context vectors) exceeds the tower's {tower.max_length}")
    x = tower.embed_positions(x)
    # Under autocast the attention runs in the autocast dtype: build the additive mask in it too
    # (SDPA rejects a float32 mask with bf16 queries).
    dev = x.device.type
    mask_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    mask = tower.block_mask(attention_mask, mask_dtype)
    hidden = []
    for i in range(tower.num_layers):
        if prompts is not None and 0 < i < len(prompts):
            p = prompts[i].to(x.dtype).expand(b, -1, -1)
            x = torch.cat([x[:, :1], p, x[:, 1 + n :]], dim=1)
        x = tower.run_block(i, x, mask)
        hidden.append(x)
    if eos_token_id is not None:
        eos_index = (input_ids == eos_token_id).int().argmax(dim=-1) + n
    else:
        eos_index = torch.zeros(b, dtype=torch.long, device=x.device)
    pooled = tower.pool(x, eos_index)
    last = tower.final_norm(x) if hasattr(tower, "final_norm") else x
    return tower.project(pooled), hidden, last, attention_mask


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] (the data layer's range) -> (x01 - mean) / std."""
    m = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, 3, 1, 1)
    return ((pixels + 1.0) * 0.5 - m) / s


def resize_logits(logits: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) -> (B, 1, H, W) bilinear (identity when equal)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
