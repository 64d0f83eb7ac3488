"""What every VLSM network shares: tuning modes, freezing, prompt learners / adapters / upsampler set-up.

Modes (seed 000: zero-shot, end-to-end, decoder; seed 002: prompt tuning; seed 003: adapters)::

    zero_shot                      nothing trains
    e2e                            every parameter trains
    decoder                        encoders frozen, decoder trains
    coop cocoop                    textual prompts (+ learnable upsampler); encoders and decoder frozen
    vpt                            visual prompts (ViT models only)
    maple shared_separate shared_attention   multimodal prompts (ViT models only)
    adapter_{shallow,dense}_{v,vl,vlc}       adapters only (ViT models only)
"""

from __future__ import annotations

import torch
from torch import nn

from segicl.vlsm.adapters import KINDS, PLACEMENTS, VLSMAdapters
from segicl.vlsm.prompt_learners import LEARNERS, TEXT_LEARNERS, PromptLearner, build_learner
from segicl.vlsm.upsampler import LearnableUpsampler

ADAPTER_MODES = tuple(f"adapter_{k}_{p}" for k in KINDS for p in PLACEMENTS)
MODES = ("zero_shot", "e2e", "decoder", *LEARNERS, *ADAPTER_MODES)
CTX_INIT_LEARNERS = ("coop", "cocoop", "maple")


def check_mode(mode: str, has_vit: bool) -> None:
    """Raise ``ValueError`` for an unknown mode or one the architecture cannot take."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    if not has_vit and (mode in ADAPTER_MODES or (mode in LEARNERS and mode not in TEXT_LEARNERS)):
        raise ValueError(
            f"mode {mode!r} needs a ViT encoder; this model (CNN vision encoder) supports "
            f"zero_shot, e2e, decoder, {', '.join(TEXT_LEARNERS)}"
        )


class VLSMNet(nn.Module):
    """Base class of the VLSM networks (CLIPSeg-style and CRIS).

    Subclasses set in ``__init__``: ``text_tower`` (a view from :mod:`segicl.vlsm.towers`),
    ``vision_tower`` (ViT view or None), ``image_embed_dim``, ``cond_dim``, ``extract_layers``,
    ``upsampler_in`` ((channels, scale) of the penultimate decoder map) and implement
    ``encoder_modules()``, ``decoder_modules()`` and ``forward(pixel_values, input_ids, attention_mask)``.
    """

    has_vit = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "e2e"
        self.learner: PromptLearner | None = None
        self.adapters: VLSMAdapters | None = None
        self.upsampler: LearnableUpsampler | None = None

    # ----------------------------------------------------------------------------- structure
    def encoder_modules(self) -> list[nn.Module]:
        raise TypeError(f"{type(self).__name__} must define encoder_modules()")

    def decoder_modules(self) -> list[nn.Module]:
        raise TypeError(f"{type(self).__name__} must define decoder_modules()")

    def tuning_modules(self) -> list[nn.Module]:
        return [m for m in (self.learner, self.adapters, self.upsampler) if m is not None]

    @property
    def n_text_context(self) -> int:
        """Text tokens added by the prompt learner (room to leave when tokenizing)."""
        return self.learner.n_ctx if (self.learner is not None and self.learner.prompts_text) else 0

    @property
    def n_vision_context(self) -> int:
        return self.learner.n_ctx if (self.learner is not None and self.learner.prompts_vision) else 0

    # ----------------------------------------------------------------------------- modes
    def context_init_embeds(self, tokenizer, text: str | None) -> torch.Tensor | None:
        """(k, D_text) token embeddings of ``text`` without special tokens (CoOp's "a photo of a")."""
        if not text:
            return None
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"ctx_init {text!r} tokenizes to nothing")
        emb = self.text_tower.embed_tokens(torch.tensor(ids, device=self._device()))
        return emb.detach().float().cpu() if emb.device.type != "meta" else None

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def setup_mode(self, mode: str, cfg: dict, tokenizer) -> None:
        """Build what ``mode`` trains (learner, adapters, upsampler) and freeze everything else.

        Args:
            mode: one of :data:`MODES`.
            cfg: the model config (``prompt``, ``adapter``, ``upsampler`` blocks are read).
            tokenizer: the model's tokenizer (for ``prompt.ctx_init``).
        """
        check_mode(mode, self.has_vit)
        self.mode = mode
        device = self._device()
        if mode in LEARNERS:
            pcfg = dict(cfg.get("prompt") or {})
            init = self.context_init_embeds(tokenizer, pcfg.get("ctx_init")) if mode in CTX_INIT_LEARNERS else None
            vt = self.vision_tower
            depth = int(pcfg.get("depth", 1))
            limit = min(self.text_tower.num_layers, vt.num_layers if vt is not None else 10**9)
            if depth > limit:
                raise ValueError(f"prompt depth {depth} exceeds the encoder depth {limit}")
            self.learner = build_learner(
                mode,
                text_dim=self.text_tower.width,
                vision_dim=vt.width if vt is not None else None,
                image_dim=self.image_embed_dim,
                patch_size=vt.patch_size if vt is not None else 16,
                init_embeds=init,
                cfg=pcfg,
            ).to(device)
            ucfg = dict(cfg.get("upsampler") or {})
            if ucfg.get("enabled", True):
                ch, scale = self.upsampler_in
                self.upsampler = LearnableUpsampler(
                    ch, scale, int(ucfg.get("kernel_size", 5)), float(ucfg.get("residual_init", 0.5))
                ).to(device)
        elif mode in ADAPTER_MODES:
            _, kind, placement = mode.split("_")
            acfg = dict(cfg.get("adapter") or {})
            self.adapters = VLSMAdapters(
                kind,
                placement,
                vision_dim=self.vision_tower.width,
                text_dim=self.text_tower.width,
                cond_dim=self.cond_dim,
                extract_layers=self.extract_layers,
                text_layers=self.text_tower.num_layers,
                dense_bottleneck=int(acfg.get("dense_bottleneck", 64)),
                shallow_bottleneck=int(acfg.get("shallow_bottleneck", 512)),
                cond_bottleneck=int(acfg.get("cond_bottleneck", 256)),
            ).to(device)
            self.adapters.attach(self.vision_tower, self.text_tower)
        self.apply_freezing()

    def apply_freezing(self) -> None:
        """Set ``requires_grad`` for the current mode."""
        self.requires_grad_(False)
        if self.mode == "e2e":
            self.requires_grad_(True)
        elif self.mode == "decoder":
            for m in self.decoder_modules():
                m.requires_grad_(True)
        for m in self.tuning_modules():
            m.requires_grad_(True)

    def train(self, mode: bool = True):
        """Train mode for trainable parts; frozen encoders / decoders stay in eval (BatchNorm, dropout)."""
        super().train(mode)
        if mode:
            for m in self.encoder_modules() + self.decoder_modules():
                if not any(p.requires_grad for p in m.parameters()):
                    m.eval()
        return self
