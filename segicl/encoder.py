"""The multimodal encoder (paper section 3.1): interleaved text, support pairs and query -> S.

* Vision: an open_clip ``VisionTransformer`` (tiny config built locally with random weights, or a
  named open_clip model with a local checkpoint for the paper preset) returns patch tokens; the
  patch grid is average-pooled to ``pool_to x pool_to`` tokens and an MLP projector maps them into
  the LM width. Its pooled embedding doubles as the retrieval embedding (:meth:`embed_images`).
* Masks: the frozen condition encoder's tokens C of each support mask, pooled to the same grid, go
  through a second MLP projector (the supports speak the same "language" the decoder reads).
* Text: :class:`ByteTokenizer` (UTF-8 bytes + 3 specials; ships with the code, needs no download,
  keeps the tiny LM's embedding table at 259 rows instead of ~50k) or a local Hugging Face tokenizer
  (``lm.tokenizer = "hf:<dir>"``, paper preset: the Qwen2 tokenizer).
* transformers ``Qwen2Model`` reads
  ``[text] <img> img_1 <mask> mask_1 ... <img> img_k <mask> mask_k <query> query <slots> q_1 .. q_N``
  (``<...>`` are learned marker embeddings, q_i learned query slots), left-padded so every item's
  slots are the last N positions; any k in 0..K_max per item within one batch. A projector maps the
  hidden states at the slots to the predicted condition tokens S (N x d_c), layer-normalised like C.

Two layout options (``lm.slot_init``, ``lm.support_tokens``; the defaults are the paper's):

* ``slot_init="query"``: slot i starts as its learned embedding plus a projection of the query's
  image feature at condition-grid cell i, so every slot is tied to the pixels whose label it predicts
  (with learned slots the LM must route 8 x 8 cells of output through a 4 x 4 pooled image).
* ``support_tokens="fused"``: each support contributes ``<img>`` and one token per grid cell, the sum
  of the cell's image token and mask token. A query cell can find a similar support cell and read its
  label in one attention hop; interleaved segments need two (match the image token, then look
  ``pool_to^2 + 1`` positions further).

A third option, ``lm.support_prior="attention"``, adds an explicit path from the supports to S
(few-shot segmentation's label propagation, e.g. the dense matching of PANet / UniverSeg's
support-query interaction): every query patch attends to all patches of its supports by cosine
similarity of learned keys over the vision features (learned temperature) and averages their mask
values (support masks area-pooled to the patch grid). The resulting prior map, pooled to the
condition grid, is projected and added to the slots together with a "has supports" flag. It needs
the raw support masks (``support_masks``), which the pipeline and the stage tasks pass.

The dense layout (``lm.support_tokens="dense"``, issue 16) is built for matching, not for pooled
slots: ``[text] <img> s_1 ... <img> s_k <query> q``, where every image contributes its whole patch
grid, one token per condition-grid cell (8 x 8 at the tiny preset). A token is the vision tower's
patch token, plus a projection of the multi-scale patch features of segicl/matching.py on the 4 x 4
sub-cells under it (contrast, ridges: cues that hold on any modality), plus a learned 2-D position
embedding. A support token adds an embedding of its cell's mask (the cell's mask pixels, so the
label says where inside the cell the boundary runs). The LM's outputs at the query's tokens are the
condition map S (one condition token per cell, what the decoder reads) and, through a linear mask
head, the mask logits of every pixel of the cell (trained on true masks beside the MSE on C). With
``lm.support_prior="propagation"`` each query token also carries the training-free label
propagation of its cell (``matching`` settings) and a "has supports" flag, and the mask head is a
residual on the propagation's logit (zero-initialised head + a learned gain, items with supports):
the learned matcher starts exactly where the propagation is and is trained to correct it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from segicl.config import SegICLConfig
from segicl.matching import match_supports, patch_features, propagate_labels

MARKERS = {"image": 0, "mask": 1, "query": 2, "slots": 3}


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0 = pad, 1 = bos, 2 = eos, 3 + b for byte b (vocab 259)."""

    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
    vocab_size = 259
    name = "bytes"

    def encode(self, text: str, max_len: int) -> list[int]:
        ids = [self.bos_id] + [self.offset + b for b in text.encode("utf-8")][: max_len - 2] + [self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (e.g. the Qwen2 one next to its weights)."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"lm.tokenizer = 'hf:{path}': tokenizer directory not found")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"lm.tokenizer = 'hf:{path}': no usable tokenizer there ({e})") from None
        self.vocab_size = len(self.tok)
        self.name = f"hf:{path}"

    def encode(self, text: str, max_len: int) -> list[int]:
        return self.tok(text, truncation=True, max_length=max_len)["input_ids"]


def build_tokenizer(spec: str):
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("hf:"):
        return HFTokenizer(spec[3:])
    raise ValueError(f"unknown tokenizer {spec!r}; use 'bytes' or 'hf:<local dir>'")


def build_vision_tower(cfg: SegICLConfig) -> nn.Module:
    """open_clip vision tower returning (pooled, tokens): random init from the config, or the local
    checkpoint of ``vision.pretrained`` (paper preset; :func:`segicl.pretrained.load_vision_tower`)."""
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    v = cfg.vision
    if v.model_name or v.pretrained:
        from segicl.pretrained import load_vision_tower

        return load_vision_tower(cfg)
    vcfg = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio,
                         patch_size=v.patch_size, image_size=cfg.image_size, output_tokens=True)
    return _build_vision_tower(v.embed_dim, vcfg)


def build_lm(cfg: SegICLConfig, vocab_size: int) -> Qwen2Model:
    lm = cfg.lm
    if lm.pretrained:
        from segicl.pretrained import load_lm

        return load_lm(cfg, vocab_size)
    qcfg = Qwen2Config(
        vocab_size=vocab_size, hidden_size=lm.hidden_size, num_hidden_layers=lm.num_hidden_layers,
        num_attention_heads=lm.num_attention_heads, num_key_value_heads=lm.num_key_value_heads,
        intermediate_size=lm.intermediate_size, max_position_embeddings=lm.max_position_embeddings,
        rope_theta=lm.rope_theta, tie_word_embeddings=False, use_cache=False,
    )
    return Qwen2Model(qcfg)


def _mlp(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


# ImageNet-style CLIP normalisation of [-1, 1] inputs
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MultimodalEncoder(nn.Module):
    DENSE_FEATURES = 30  # multi-scale patch features of segicl/matching.py (position excluded)

    def __init__(self, cfg: SegICLConfig, vision: nn.Module | None = None, lm: Qwen2Model | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg.lm.tokenizer)
        self.vision = vision if vision is not None else build_vision_tower(cfg)
        self.lm = lm if lm is not None else build_lm(cfg, self.tokenizer.vocab_size)
        h = self.lm.config.hidden_size
        width = self._vision_width()
        self.image_proj = _mlp(width, h)
        self.markers = nn.Embedding(len(MARKERS), h)
        if cfg.lm.support_tokens != "dense":  # the dense layout has neither pooled mask tokens nor slots
            self.mask_proj = _mlp(cfg.condition.dim, h)
            self.slots = nn.Parameter(torch.randn(1, cfg.num_condition_tokens, h) * 0.02)
        if cfg.lm.slot_init == "query":
            self.slot_proj = _mlp(width, h)
        if cfg.lm.support_tokens == "dense":
            g = cfg.image_size // cfg.vision.patch_size
            cell = cfg.mask_size // g  # mask pixels per token side
            self.dense_grid, self.dense_cell = g, cell
            self.feat_proj = _mlp(self.DENSE_FEATURES * 16, h)  # 4 x 4 sub-cells of multi-scale features
            self.pos_embed = nn.Parameter(torch.randn(1, g * g, h) * 0.02)
            self.label_embed = _mlp(cell * cell, h)
            self.mask_head = nn.Linear(h, cell * cell)
            if cfg.lm.support_prior == "propagation":
                self.prop_embed = _mlp(cell * cell + 1, h)
                # residual: mask logits = head + gain x logit(propagation) for items with supports; the head
                # starts at zero, so the learned path starts exactly at the propagation and learns corrections
                nn.init.zeros_(self.mask_head.weight)
                nn.init.zeros_(self.mask_head.bias)
                self.prop_gain = nn.Parameter(torch.tensor(1.0))
        if cfg.lm.support_prior == "attention":
            self.prior_key = nn.Linear(width, 64)
            self.prior_logit_scale = nn.Parameter(torch.tensor(2.3))  # exp(2.3) ~ 10 = 1 / temperature
            self.prior_proj = _mlp(2, h)
        self.out_proj = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, cfg.condition.dim))
        self.register_buffer("clip_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def _vision_width(self) -> int:
        tr = getattr(self.vision, "transformer", None)
        if getattr(self.vision, "attn_pool", "absent") is None and hasattr(tr, "width"):
            return tr.width  # open_clip ViT: tokens are the transformer width (no forward of a 2B tower on CPU)
        with torch.no_grad():
            s = self.cfg.image_size
            _, tokens = self.vision(torch.zeros(1, 3, s, s))
        return tokens.shape[-1]

    # ------------------------------------------------------------------ vision
    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        return ((images + 1) / 2 - self.clip_mean) / self.clip_std

    def vision_grid(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) in [-1, 1] -> patch tokens as a grid (n, width, g, g)."""
        _, tokens = self.vision(self._normalise(images))
        n, t, w = tokens.shape
        g = int(round(t**0.5))
        return tokens.transpose(1, 2).reshape(n, w, g, g)

    @staticmethod
    def _to_grid(grid: torch.Tensor, g: int) -> torch.Tensor:
        """(n, w, a, a) -> (n, g*g, w): average-pooled (a >= g) or bilinearly upsampled (a < g)."""
        if grid.shape[-1] >= g:
            out = F.adaptive_avg_pool2d(grid, g)
        else:
            out = F.interpolate(grid, size=(g, g), mode="bilinear", align_corners=False)
        return out.flatten(2).transpose(1, 2)

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised pooled image embeddings (retrieval)."""
        pooled, _ = self.vision(self._normalise(images))
        return F.normalize(pooled.float(), dim=-1)

    def mask_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition tokens (n, N, d_c) -> pooled (n, pool_to^2, d_c)."""
        n, t, d = cond.shape
        g = int(round(t**0.5))
        return self._to_grid(cond.transpose(1, 2).reshape(n, d, g, g), self.cfg.vision.pool_to)

    def support_prior(self, q_grid: torch.Tensor, s_grid: torch.Tensor, support_masks: torch.Tensor | None,
                      ks: list[int]) -> torch.Tensor:
        """Label propagation over learned keys: (b, w, g, g) query and (sum k, w, g, g) support
        features, (b, K, 1, M, M) support masks -> (b, 1, g, g) prior in [0, 1] (zeros where k = 0)."""
        q = F.normalize(self.prior_key(q_grid.flatten(2).transpose(1, 2)), dim=-1)
        sk = F.normalize(self.prior_key(s_grid.flatten(2).transpose(1, 2)), dim=-1)
        return propagate_labels(q, sk, support_masks, ks, self.prior_logit_scale.exp())

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: list[str]) -> list[torch.Tensor]:
        return [torch.tensor(self.tokenizer.encode(t or "", self.cfg.lm.max_text_tokens), dtype=torch.long) for t in texts]

    # ------------------------------------------------------------------ dense layout
    def _cells(self, x: torch.Tensor) -> torch.Tensor:
        """(n, c, M, M) at mask resolution -> (n, g*g, c * cell^2): the pixels under each token."""
        return F.pixel_unshuffle(x, self.dense_cell).flatten(2).transpose(1, 2)

    def dense_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, g*g, h): vision patch token (``lm.dense_vision``) + multi-scale features of its
        4 x 4 sub-cells + position."""
        g = self.dense_grid
        vis = self.image_proj(self._to_grid(self.vision_grid(images), g)) if self.cfg.lm.dense_vision else 0
        with torch.no_grad():
            f = patch_features(images.float(), 4 * g, 0.0, "multiscale")  # (n, 16 g^2, d), unit norm
            f = f.transpose(1, 2).reshape(len(images), -1, 4 * g, 4 * g)
            f = F.pixel_unshuffle(f, 4).flatten(2).transpose(1, 2)  # (n, g^2, 16 d)
        return vis + self.feat_proj(f.to(self.pos_embed.dtype)) + self.pos_embed

    def _dense(self, texts: list[str], query_images: torch.Tensor, support_images: torch.Tensor | None,
               support_masks: torch.Tensor | None, ks: list[int]) -> dict[str, torch.Tensor]:
        b, dev = query_images.shape[0], query_images.device
        if sum(ks) and support_masks is None:
            raise ValueError("lm.support_tokens='dense' needs support_masks")
        m = self.cfg.mask_size
        imgs = [query_images] + [support_images[i, : ks[i]] for i in range(b) if ks[i]]
        tok = self.dense_tokens(torch.cat(imgs))
        mk = self.markers.weight
        q_tok = tok[:b] + mk[2]
        out: dict[str, torch.Tensor] = {}
        has = torch.tensor([float(k > 0) for k in ks], device=dev, dtype=q_tok.dtype)  # items with supports
        if self.cfg.lm.support_prior == "propagation":
            if sum(ks):
                with torch.no_grad():
                    prior = match_supports(query_images.float(), support_images.float(), support_masks.float(), ks,
                                           self.cfg.matching, m)
            else:
                prior = query_images.new_zeros(b, 1, m, m)
            flag = has.view(b, 1, 1).expand(b, q_tok.shape[1], 1)
            q_tok = q_tok + self.prop_embed(torch.cat([self._cells(prior.to(q_tok.dtype)), flag], -1))
            out["prior"] = prior
        if sum(ks):
            smask = torch.cat([support_masks[i, : ks[i]] for i in range(b) if ks[i]]).float()
            if smask.shape[-1] != m:
                smask = F.interpolate(smask, size=(m, m), mode="area")
            s_tok = tok[b:] + mk[0] + self.label_embed(self._cells(smask.to(tok.dtype)))
        emb = self.lm.get_input_embeddings()
        seqs, j = [], 0
        for i, ids in enumerate(self.tokenize(texts)):
            parts = [emb(ids.to(dev))]
            for _ in range(ks[i]):
                parts += [mk[0:1], s_tok[j]]
                j += 1
            parts += [mk[2:3], q_tok[i]]
            seqs.append(torch.cat(parts))
        hidden = self._run_lm(seqs)[:, -q_tok.shape[1]:]
        s_pred = self.out_proj(hidden)
        out["cond"] = F.layer_norm(s_pred, (s_pred.shape[-1],))
        logits = self.mask_head(hidden).transpose(1, 2).reshape(b, -1, self.dense_grid, self.dense_grid)
        logits = F.pixel_shuffle(logits, self.dense_cell)  # (b, 1, M, M)
        if "prior" in out:
            logits = logits + has.view(b, 1, 1, 1).to(logits.dtype) * self.prop_gain * torch.logit(out["prior"].to(logits.dtype).clamp(1e-3, 1 - 1e-3))
        out["mask_logits"] = logits
        return out

    def _run_lm(self, seqs: list[torch.Tensor]) -> torch.Tensor:
        """Left-pad the embedded sequences (the output positions are the last ones of every item) and run the LM."""
        b, dev = len(seqs), seqs[0].device
        length = max(s.shape[0] for s in seqs)
        h = seqs[0].shape[-1]
        x = torch.zeros(b, length, h, dtype=seqs[0].dtype, device=dev)
        attn = torch.zeros(b, length, dtype=torch.long, device=dev)
        for i, s in enumerate(seqs):
            x[i, length - s.shape[0]:] = s
            attn[i, length - s.shape[0]:] = 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        return self.lm(inputs_embeds=x, attention_mask=attn, position_ids=pos).last_hidden_state

    # ------------------------------------------------------------------ forward
    def forward(self, texts: list[str], query_images: torch.Tensor, support_images: torch.Tensor | None = None,
                support_cond: torch.Tensor | None = None, num_supports: torch.Tensor | list[int] | None = None,
                support_masks: torch.Tensor | None = None, return_dict: bool = False) -> torch.Tensor | dict:
        """Predict condition tokens S.

        Args:
            texts: B instructions.
            query_images: (B, 3, S, S) in [-1, 1].
            support_images: (B, K, 3, S, S), padded beyond each item's k.
            support_cond: (B, K, N, d_c) condition-encoder tokens of the support masks.
            num_supports: (B,) k per item (0..K); None means all K.
            support_masks: (B, K, 1, M, M) binary support masks; needed by ``lm.support_prior="attention"``
                and by the dense layout (which ignores ``support_cond``).
            return_dict: dense layout only: return ``{"cond": S, "mask_logits": (B, 1, M, M)[, "prior"]}``.

        Returns:
            S: (B, N, d_c).
        """
        b = query_images.shape[0]
        if len(texts) != b:
            raise ValueError(f"{len(texts)} texts for {b} query images")
        dev = query_images.device
        if support_images is None or support_images.shape[1] == 0:
            ks = [0] * b
        else:
            K = support_images.shape[1]
            ks = [K] * b if num_supports is None else [int(k) for k in num_supports]
            if any(k < 0 or k > K for k in ks):
                raise ValueError(f"num_supports {ks} outside 0..{K}")
        if self.cfg.lm.support_tokens == "dense":
            out = self._dense(texts, query_images, support_images, support_masks, ks)
            return out if return_dict else out["cond"]
        if return_dict:
            raise ValueError("return_dict needs lm.support_tokens='dense'")
        emb = self.lm.get_input_embeddings()
        # one vision pass over every query and real support image
        imgs = [query_images] + [support_images[i, : ks[i]] for i in range(b) if ks[i]]
        grid = self.vision_grid(torch.cat(imgs))
        vis = self.image_proj(self._to_grid(grid, self.cfg.vision.pool_to))
        q_tok, s_tok = vis[:b], vis[b:]
        slots = self.slots.expand(b, -1, -1)
        gc = int(round(self.cfg.num_condition_tokens**0.5))  # side of the condition grid
        if self.cfg.lm.slot_init == "query":
            slots = slots + self.slot_proj(self._to_grid(grid[:b], gc))
        if self.cfg.lm.support_prior == "attention":
            if sum(ks) and support_masks is None:
                raise ValueError("lm.support_prior='attention' needs support_masks")
            prior = self.support_prior(grid[:b], grid[b:], support_masks, ks)  # zeros for items with k = 0
            has = torch.tensor([float(k > 0) for k in ks], device=dev, dtype=prior.dtype).view(b, 1, 1, 1)
            feats = torch.cat([prior, has.expand_as(prior)], dim=1)
            slots = slots + self.prior_proj(self._to_grid(feats, gc))
        if sum(ks):
            conds = torch.cat([support_cond[i, : ks[i]] for i in range(b) if ks[i]])
            m_tok = self.mask_proj(self.mask_tokens(conds.to(vis.dtype)))
        fused = self.cfg.lm.support_tokens == "fused"
        mk = self.markers.weight
        seqs = []
        j = 0
        for i, ids in enumerate(self.tokenize(texts)):
            parts = [emb(ids.to(dev))]
            for _ in range(ks[i]):
                parts += [mk[0:1], s_tok[j] + m_tok[j]] if fused else [mk[0:1], s_tok[j], mk[1:2], m_tok[j]]
                j += 1
            parts += [mk[2:3], q_tok[i], mk[3:4], slots[i]]
            seqs.append(torch.cat(parts))
        out = self._run_lm(seqs)  # left padding: the slots are the last N positions of every item
        n = self.cfg.num_condition_tokens
        s_pred = self.out_proj(out[:, -n:])
        return F.layer_norm(s_pred, (s_pred.shape[-1],))
