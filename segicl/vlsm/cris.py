"""CRIS: CLIP-Driven Referring Image Segmentation (Wang et al., CVPR 2022), 416 px.

Backbone: an open_clip ``CLIP`` with the ModifiedResNet image tower (RN50: layers 3/4/6/3, width
64, embedding 1024) and the CLIP text transformer (width 512). CRIS changes the attention pool to
keep the spatial map (no mean token, positional embedding resized to the grid, a 1x1 conv + BN
residual ``attnpool.connect``), giving C3 / C4 / C5 = 512 / 1024 / 1024 channels at strides 8 / 16 / 32.

Neck: a text-conditioned FPN (C5 multiplied by the projected sentence, fused top-down, CoordConv) to
a (B, 512, S/16, S/16) map. Decoder: 3 vision-language transformer layers (self-attention on
pixels, cross-attention to the word features with their padding mask, 2-D / 1-D sine positions).
Projector: the map is upsampled x4 and convolved with a per-sentence 3x3 kernel predicted from the
sentence embedding (text-to-pixel dynamic convolution) -> (B, 1, S/4, S/4) logits, resized to S.

Module and parameter names follow the CRIS code, so a CRIS checkpoint (``state_dict`` with
``backbone.* neck.* decoder.* proj.*`` keys, ``module.`` prefixes stripped) loads with
``checkpoint: <file>``; ``clip_checkpoint`` loads OpenAI's RN50 weights (JIT archive or state dict)
into the backbone only. No official CRIS weights exist.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from segicl.vlsm.base import VLSMNet
from segicl.vlsm.towers import (
    CLIP_MEAN,
    CLIP_STD,
    OpenCLIPTextTower,
    encode_text,
    normalize_pixels,
    resize_logits,
)

CRIS_RN50 = {
    "embed_dim": 1024,
    "vision": {"layers": [3, 4, 6, 3], "width": 64, "image_size": 224},
    "text": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    "fpn_in": [512, 1024, 1024],
    "fpn_out": [256, 512, 1024],
    "vis_dim": 512,
    "num_layers": 3,
    "num_head": 8,
    "dim_ffn": 2048,
    "dropout": 0.1,
}


class SafeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that uses its running statistics for a training batch of one (CRIS's text projection
    would otherwise fail on the last, single-sample batch of an epoch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


def conv_layer(in_dim: int, out_dim: int, kernel_size: int = 1, padding: int = 0, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_dim, out_dim, kernel_size, stride, padding, bias=False), nn.BatchNorm2d(out_dim), nn.ReLU(True)
    )


def linear_layer(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), SafeBatchNorm1d(out_dim), nn.ReLU(True))


class CoordConv(nn.Module):
    """Conv over the input with two extra channels of x / y coordinates in [-1, 1]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, padding: int = 1):
        super().__init__()
        self.conv1 = conv_layer(in_channels + 2, out_channels, kernel_size, padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([gx, gy])[None].expand(b, -1, -1, -1)
        return self.conv1(torch.cat([x, coords], dim=1))


class FPN(nn.Module):
    """CRIS's sentence-conditioned FPN: (C3, C4, C5) + sentence (B, E) -> (B, out[1], S/16, S/16)."""

    def __init__(self, in_channels: list[int], out_channels: list[int]):
        super().__init__()
        if len(in_channels) != 3 or len(out_channels) != 3:
            raise ValueError("FPN needs three input and three output widths")
        c3, c4, c5 = in_channels
        o3, o4, o5 = out_channels
        self.txt_proj = linear_layer(c5, o5)
        self.f1_v_proj = conv_layer(c5, o5, 1, 0)
        self.norm_layer = nn.Sequential(nn.BatchNorm2d(o5), nn.ReLU(True))
        self.f2_v_proj = conv_layer(c4, o4, 3, 1)
        self.f2_cat = conv_layer(o5 + o4, o4, 1, 0)
        self.f3_v_proj = conv_layer(c3, o3, 3, 1)
        self.f3_cat = conv_layer(o3 + o4, o4, 1, 0)
        self.f4_proj5 = conv_layer(o5, o4, 3, 1)
        self.f4_proj4 = conv_layer(o4, o4, 3, 1)
        self.f4_proj3 = conv_layer(o4, o4, 3, 1)
        self.aggr = conv_layer(3 * o4, o4, 1, 0)
        self.coordconv = nn.Sequential(CoordConv(o4, o4, 3, 1), conv_layer(o4, o4, 3, 1))

    def forward(self, feats: tuple[torch.Tensor, torch.Tensor, torch.Tensor], state: torch.Tensor) -> torch.Tensor:
        v3, v4, v5 = feats
        state = self.txt_proj(state)[:, :, None, None]  # (B, o5, 1, 1)
        f5 = self.norm_layer(self.f1_v_proj(v5) * state)  # (B, o5, S/32)
        f4 = self.f2_cat(torch.cat([self.f2_v_proj(v4), F.interpolate(f5, size=v4.shape[-2:], mode="bilinear")], 1))
        f3 = F.avg_pool2d(self.f3_v_proj(v3), 2, 2)
        f3 = self.f3_cat(torch.cat([f3, f4], 1))  # (B, o4, S/16)
        fq5 = F.interpolate(self.f4_proj5(f5), size=f4.shape[-2:], mode="bilinear")
        fq = self.aggr(torch.cat([self.f4_proj3(f3), self.f4_proj4(f4), fq5], 1))
        return self.coordconv(fq)


def _pos1d(d: int, length: int, ref: torch.Tensor) -> torch.Tensor:
    """(length, d) sine / cosine positions."""
    pos = torch.arange(length, device=ref.device, dtype=ref.dtype)[:, None]
    freq = 1e-4 ** (torch.arange(0, d, 2, device=ref.device, dtype=ref.dtype) / d)
    pe = torch.zeros(length, d, device=ref.device, dtype=ref.dtype)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    return pe


def _pos2d(d: int, h: int, w: int, ref: torch.Tensor) -> torch.Tensor:
    """(h * w, d) 2-D sine positions: first half of the channels encode x, second half y."""
    if d % 4:
        raise ValueError(f"2-D sine positions need a width divisible by 4, got {d}")
    half = d // 2
    px = _pos1d(half, w, ref)[None].expand(h, -1, -1)  # (h, w, half)
    py = _pos1d(half, h, ref)[:, None].expand(-1, w, -1)
    return torch.cat([px, py], dim=-1).reshape(h * w, d)


class VLDecoderLayer(nn.Module):
    """CRIS's vision-language decoder layer (pre-norm self-attn, cross-attn to words, FFN), batch first."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn_norm = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, dim_feedforward), nn.ReLU(True), nn.Dropout(dropout),
            nn.LayerNorm(dim_feedforward), nn.Linear(dim_feedforward, d_model),
        )
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)

    def forward(self, vis, txt, vis_pos, txt_pos, pad_mask):
        """vis (B, HW, C), txt (B, L, C), vis_pos (HW, C), txt_pos (L, C), pad_mask (B, L) True = pad."""
        v = self.norm1(vis)
        q = v + vis_pos
        v = self.self_attn_norm(self.self_attn(q, q, v, need_weights=False)[0])
        vis = vis + self.dropout1(v)
        v = self.norm2(vis)
        v = self.multihead_attn(v + vis_pos, txt + txt_pos, txt, key_padding_mask=pad_mask, need_weights=False)[0]
        vis = vis + self.dropout2(self.cross_attn_norm(v))
        return vis + self.dropout3(self.ffn(self.norm3(vis)))


class VLDecoder(nn.Module):
    """Stack of :class:`VLDecoderLayer` + final LayerNorm: (B, C, H, W) x words -> (B, C, H, W)."""

    def __init__(self, num_layers: int, d_model: int, nhead: int, dim_ffn: int, dropout: float):
        super().__init__()
        self.layers = nn.ModuleList(VLDecoderLayer(d_model, nhead, dim_ffn, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, vis: torch.Tensor, txt: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = vis.shape
        vis_pos, txt_pos = _pos2d(c, h, w, vis), _pos1d(txt.shape[-1], txt.shape[1], txt)
        x = vis.flatten(2).transpose(1, 2)  # (B, HW, C)
        for layer in self.layers:
            x = layer(x, txt, vis_pos, txt_pos, pad_mask)
        return self.norm(x).transpose(1, 2).reshape(b, c, h, w)


class Projector(nn.Module):
    """Text-to-pixel projector: x4 upsampled visual features convolved with a kernel predicted from the sentence."""

    def __init__(self, word_dim: int, in_dim: int, kernel_size: int = 3):
        super().__init__()
        self.in_dim, self.kernel_size = in_dim, kernel_size
        self.vis = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear"), conv_layer(in_dim * 2, in_dim * 2, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"), conv_layer(in_dim * 2, in_dim, 3, padding=1),
            nn.Conv2d(in_dim, in_dim, 1),
        )
        self.txt = nn.Linear(word_dim, in_dim * kernel_size * kernel_size + 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, 2 in_dim, h, w), state (B, E) -> logits (B, 1, 4h, 4w) and the features (B, in_dim, 4h, 4w)."""
        feats = self.vis(x)
        b, c, h, w = feats.shape
        params = self.txt(state)
        weight = params[:, :-1].reshape(b, c, self.kernel_size, self.kernel_size)
        out = F.conv2d(feats.reshape(1, b * c, h, w), weight, bias=params[:, -1], padding=self.kernel_size // 2, groups=b)
        return out.transpose(0, 1), feats


def _attnpool_heads(pool: nn.Module) -> int:
    return pool.num_heads


def _attend(pool: nn.Module, query: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip AttentionPool2d's attention with its own weights: (Lq, B, C) x (Lk, B, C) -> (Lq, B, out)."""
    out, _ = F.multi_head_attention_forward(
        query=query, key=tokens, value=tokens, embed_dim_to_check=tokens.shape[-1], num_heads=_attnpool_heads(pool),
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=pool.training, need_weights=False,
    )
    return out


def _resized_pos(pool: nn.Module, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-pool positions: (1, C) class position and (h * w, C) spatial ones (bicubic-resized)."""
    pos = pool.positional_embedding
    side = int(round((pos.shape[0] - 1) ** 0.5))
    spatial = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if (side, side) != (h, w):
        spatial = F.interpolate(spatial, size=(h, w), mode="bicubic", align_corners=False)
    return pos[:1], spatial.flatten(2)[0].T


class CRISNet(VLSMNet):
    """CRIS. ``forward(pixels in [-1, 1] (B, 3, S, S), ids, mask) -> (B, 1, S, S)`` logits."""

    has_vit = False

    def __init__(self, arch: dict, eos_token_id: int, mean=CLIP_MEAN, std=CLIP_STD):
        super().__init__()
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        v, t = arch["vision"], arch["text"]
        self.backbone = CLIP(
            int(arch["embed_dim"]),
            CLIPVisionCfg(layers=tuple(v["layers"]), width=int(v["width"]), image_size=int(v["image_size"])),
            CLIPTextCfg(context_length=int(t["context_length"]), vocab_size=int(t["vocab_size"]),
                        width=int(t["width"]), heads=int(t["heads"]), layers=int(t["layers"])),
            quick_gelu=True,  # OpenAI CLIP (and so CRIS) uses QuickGELU
        )
        pool = self.backbone.visual.attnpool
        pool.connect = nn.Sequential(
            nn.Conv2d(pool.k_proj.in_features, int(arch["embed_dim"]), 1, bias=False), nn.BatchNorm2d(int(arch["embed_dim"]))
        )
        self.neck = FPN(list(arch["fpn_in"]), list(arch["fpn_out"]))
        self.decoder = VLDecoder(int(arch["num_layers"]), int(arch["vis_dim"]), int(arch["num_head"]),
                                 int(arch["dim_ffn"]), float(arch["dropout"]))
        self.proj = Projector(int(arch["embed_dim"]), int(arch["vis_dim"]) // 2, 3)
        if int(t["width"]) != int(arch["vis_dim"]):
            raise ValueError(f"CRIS cross-attends words (width {t['width']}) from pixels (vis_dim {arch['vis_dim']}): they must match")
        self.text_tower = OpenCLIPTextTower(self.backbone)
        self.vision_tower = None
        self.eos_token_id = eos_token_id
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_embed_dim = self.cond_dim = int(arch["embed_dim"])
        self.extract_layers: list[int] = []
        self.upsampler_in = (int(arch["vis_dim"]) // 2, 1.0)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.backbone]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.neck, self.decoder, self.proj]

    def encode_image(self, pixels: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """Normalised (B, 3, S, S) -> ((C3, C4, C5 spatial), x4) where x4 is layer4's (B, 32 w, S/32, S/32)."""
        vis = self.backbone.visual
        x = vis.layer1(vis.stem(pixels))
        c3 = vis.layer2(x)
        c4 = vis.layer3(c3)
        x4 = vis.layer4(c4)
        pool = vis.attnpool
        b, c, h, w = x4.shape
        _, pos = _resized_pos(pool, h, w)
        tokens = (x4.flatten(2).transpose(1, 2) + pos).transpose(0, 1)  # (HW, B, C)
        c5 = _attend(pool, tokens, tokens).permute(1, 2, 0).reshape(b, -1, h, w)
        c5 = torch.relu(c5 + pool.connect(x4))
        return (c3, c4, c5), x4

    def image_embedding(self, x4: torch.Tensor) -> torch.Tensor:
        """CLIP's global image embedding (mean-token attention pool) from layer4's map: (B, E)."""
        pool = self.backbone.visual.attnpool
        b, c, h, w = x4.shape
        cls_pos, pos = _resized_pos(pool, h, w)
        flat = x4.flatten(2).transpose(1, 2)  # (B, HW, C)
        tokens = torch.cat([flat.mean(1, keepdim=True) + cls_pos, flat + pos], dim=1).transpose(0, 1)
        return _attend(pool, tokens[:1], tokens)[0]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        px = normalize_pixels(pixel_values, self.mean, self.std)
        feats, x4 = self.encode_image(px)
        ctx = None
        if self.learner is not None:
            ctx = self.learner(self.image_embedding(x4) if self.learner.needs_image_embedding else None)
        state, _, words, key_mask = encode_text(
            self.text_tower, input_ids, attention_mask, ctx.text if ctx else None, self.eos_token_id
        )
        fq = self.neck(feats, state)
        fq = self.decoder(fq, words, ~key_mask.bool())
        logits, proj_feats = self.proj(fq, state)
        if self.upsampler is not None:
            logits = self.upsampler(proj_feats, logits)
        return resize_logits(logits, px.shape[-2:])


def _load_file_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:  # OpenAI's CLIP releases are TorchScript archives
        return torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def build_cris(cfg: dict) -> tuple[CRISNet, object, dict]:
    """CRIS from ``cfg["arch"]`` (default: the RN50 shape), optionally loading ``clip_checkpoint`` into
    the backbone and ``checkpoint`` (a CRIS state dict) into the whole model."""
    from segicl.vlsm.tokenizers import clip_tokenizer

    arch = {**CRIS_RN50, **(cfg.get("arch") or {})}
    tokenizer = clip_tokenizer()
    net = CRISNet(arch, int(tokenizer.eos_token_id), cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD))
    if cfg.get("clip_checkpoint"):
        state = _load_file_state(Path(cfg["clip_checkpoint"]))
        state = {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
        missing, unexpected = net.backbone.load_state_dict(state, strict=False)
        missing = [k for k in missing if ".attnpool.connect." not in k]
        if missing or unexpected:
            raise ValueError(f"{cfg['clip_checkpoint']}: CLIP weights do not fit the backbone (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if cfg.get("checkpoint"):
        state = _load_file_state(Path(cfg["checkpoint"]))
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{cfg['checkpoint']}: CRIS weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    return net, tokenizer, arch
