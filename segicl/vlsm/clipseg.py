"""CLIPSeg (Lüddecke & Ecker 2022) on transformers ``CLIPSegForImageSegmentation``.

The real checkpoint is CIDAS/clipseg-rd64-refined (352 px input, ViT-B/16, decoder reading layers
3/6/9 -- 0-based block indices as in transformers and the CLIPSeg code, i.e. the outputs of the
4th, 7th and 10th of 12 layers --, FiLM conditioning on the projected text embedding, reduce_dim 64). The forward is re-composed
from the library's own modules rather than calling ``CLIPSegForImageSegmentation.forward`` because
that method runs both encoders under ``torch.no_grad()`` (end-to-end training would be impossible)
and cannot take deep prompts or adapters.

:class:`CLIPSegDecoderHead` (the CLIPSeg decoder) is shared with BiomedCLIPSeg.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from segicl.vlsm.base import VLSMNet
from segicl.vlsm.towers import (
    CLIP_MEAN,
    CLIP_STD,
    HFCLIPTextTower,
    HFCLIPVisionTower,
    encode_text,
    encode_vision,
    normalize_pixels,
    resize_logits,
)

# CIDAS/clipseg-rd64-refined's architecture (config.json of the hub repo), used for parameter counts.
CLIPSEG_RD64_REFINED = {
    "extract_layers": [3, 6, 9],
    "reduce_dim": 64,
    "conditional_layer": 0,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 2048,
    "use_complex_transposed_convolution": True,
    "projection_dim": 512,
    "text_config": {"hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8, "num_hidden_layers": 12},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                      "patch_size": 16, "image_size": 224},
}


def clipseg_config(arch: dict):
    """A transformers ``CLIPSegConfig`` from a plain dict (``text_config`` / ``vision_config`` sub-dicts)."""
    from transformers import CLIPSegConfig

    arch = dict(arch)
    arch.pop("architectures", None)
    return CLIPSegConfig(**arch)


class CLIPSegDecoderHead(nn.Module):
    """The CLIPSeg decoder (a transformers ``CLIPSegDecoder``) run token-wise, returning its features too.

    Extra tokens after the patch tokens (visual prompts) go through the decoder's attention and are
    dropped before the transposed convolution (TuneVLSeg's layout).
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    @property
    def reduce_dim(self) -> int:
        return self.decoder.film_mul.out_features

    def forward(
        self, activations: list[torch.Tensor], cond: torch.Tensor, n_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode.

        Args:
            activations: per extract layer (shallow first), (B, T, D_v) with T >= n_tokens.
            cond: (B, P) conditional embedding.
            n_tokens: 1 + number of patch tokens (a square grid).

        Returns:
            logits (B, 1, H, W) at grid x patch size, and features (B, R, g, g) before the
            transposed convolution.
        """
        dec = self.decoder
        out = None
        for i, (act, layer, reduce) in enumerate(zip(activations[::-1], dec.layers, dec.reduces, strict=True)):
            out = reduce(act) if out is None else reduce(act) + out
            if i == dec.conditional_layer:
                out = dec.film_mul(cond)[:, None, :] * out + dec.film_add(cond)[:, None, :]
            out = layer(out, None)
        tokens = out[:, 1:n_tokens]  # (B, N, R): drop CLS and prompt tokens
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ValueError(f"decoder expects a square token grid, got {tokens.shape[1]} tokens")
        feats = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
        return dec.transposed_convolution(feats), feats


class CLIPSegStyleNet(VLSMNet):
    """A ViT + text encoder pair with the CLIPSeg decoder (CLIPSeg and BiomedCLIPSeg).

    Args:
        encoders: the module owning the encoder weights (saved under ``encoders.*``).
        vision_tower / text_tower: views over it (:mod:`segicl.vlsm.towers`).
        decoder: a transformers ``CLIPSegDecoder``.
        extract_layers: 0-based vision blocks whose outputs the decoder reads ([3, 6, 9]).
        eos_token_id: the token pooled by a CLIP text tower; None for CLS pooling (BERT).
        mean / std: pixel normalisation of the vision tower.
    """

    def __init__(
        self,
        encoders: nn.Module,
        vision_tower,
        text_tower,
        decoder: nn.Module,
        extract_layers: list[int],
        eos_token_id: int | None,
        mean=CLIP_MEAN,
        std=CLIP_STD,
    ):
        super().__init__()
        self.encoders = encoders
        self.head = CLIPSegDecoderHead(decoder)
        self.vision_tower, self.text_tower = vision_tower, text_tower
        self.extract_layers = list(extract_layers)
        if max(self.extract_layers) >= vision_tower.num_layers:
            raise ValueError(f"extract_layers {self.extract_layers} exceed the {vision_tower.num_layers} vision layers")
        self.eos_token_id = eos_token_id
        self.mean, self.std = tuple(mean), tuple(std)
        self.image_embed_dim = vision_tower.proj_dim
        self.cond_dim = text_tower.proj_dim
        self.upsampler_in = (self.head.reduce_dim, float(vision_tower.patch_size))

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoders]

    def decoder_modules(self) -> list[nn.Module]:
        return [self.head]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Segment.

        Args:
            pixel_values: (B, 3, S, S) in [-1, 1] (the data layer's range; normalised here).
            input_ids / attention_mask: (B, L) tokens (L + prompt contexts <= the text tower's length).

        Returns:
            (B, 1, S, S) logits.
        """
        px = normalize_pixels(pixel_values, self.mean, self.std)
        learner = self.learner
        ctx = learner() if (learner is not None and not learner.needs_image_embedding) else None
        need_pool = learner is not None and learner.needs_image_embedding
        acts, image_embeds = encode_vision(
            self.vision_tower, px, self.extract_layers, ctx.vision if ctx else None, run_all_layers=need_pool
        )
        if need_pool:
            ctx = learner(image_embeds)
        text = encode_text(self.text_tower, input_ids, attention_mask, ctx.text if ctx else None, self.eos_token_id)
        cond, hidden = text[0], text[1]
        if self.adapters is not None:
            acts = self.adapters.adapt_activations(acts)
            n = self.n_text_context
            pool_index = (
                (input_ids == self.eos_token_id).int().argmax(-1) + n
                if self.eos_token_id is not None
                else torch.zeros_like(input_ids[:, 0])
            )
            cond = self.adapters.adapt_condition(cond, hidden, pool_index)
        n_tokens = acts[0].shape[1] - self.n_vision_context
        logits, feats = self.head(acts, cond, n_tokens)
        if logits.ndim == 3:
            logits = logits[:, None]
        if self.upsampler is not None:
            logits = self.upsampler(feats, logits)
        return resize_logits(logits, px.shape[-2:])


def build_clipseg(cfg: dict) -> tuple[CLIPSegStyleNet, object, dict]:
    """CLIPSeg from ``cfg["pretrained"]`` (a local transformers checkpoint dir) or ``cfg["arch"]`` (random).

    Returns:
        (net, tokenizer, arch) where ``arch`` is the concrete architecture dict to rebuild it.
    """
    from transformers import CLIPSegForImageSegmentation

    from segicl.vlsm.tokenizers import clip_tokenizer, has_tokenizer_files, load_tokenizer

    pretrained = cfg.get("pretrained")
    if pretrained:
        path = Path(pretrained)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a transformers CLIPSeg checkpoint (no config.json)")
        hf = CLIPSegForImageSegmentation.from_pretrained(str(path))
        tokenizer = load_tokenizer(path) if has_tokenizer_files(path) else clip_tokenizer()
    else:
        arch = cfg.get("arch")
        if not arch:
            raise ValueError("clipseg needs either 'pretrained' (a local checkpoint dir) or an 'arch' block")
        hf = CLIPSegForImageSegmentation(clipseg_config(arch))
        tokenizer = clip_tokenizer()
    arch = hf.config.to_dict()
    arch = {k: v for k, v in arch.items() if not k.startswith("_") and k not in ("transformers_version", "architectures")}
    clip = hf.clip
    net = CLIPSegStyleNet(
        encoders=clip,
        vision_tower=HFCLIPVisionTower(clip),
        text_tower=HFCLIPTextTower(clip),
        decoder=hf.decoder,
        extract_layers=list(hf.config.extract_layers),
        eos_token_id=int(tokenizer.eos_token_id),
        mean=cfg.get("image_mean", CLIP_MEAN),
        std=cfg.get("image_std", CLIP_STD),
    )
    return net, tokenizer, arch
