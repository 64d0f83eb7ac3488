"""BiomedCLIPSeg and BiomedCLIPSeg-D (seed 000): the CLIPSeg decoder on BiomedCLIP's encoders.

BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) is an open_clip model: a timm
ViT-B/16 image tower (``visual.trunk`` + ``visual.head.proj``, 768 -> 512) and a PubMedBERT text
tower (open_clip ``HFTextEncoder``: CLS pooling, MLP projection 768 -> 640 -> 512, 256 tokens).
Its widths match CLIPSeg's decoder inputs (ViT 768, conditioning 512), so the decoder is either
random (BiomedCLIPSeg) or copied from a CLIPSeg checkpoint (BiomedCLIPSeg-D, ``decoder_from``).
The decoder reads the outputs of ViT blocks 3/6/9 (0-based) exactly as CLIPSeg does (medvlsm
indexed a list of block outputs that lacks the embedding output with CLIPSeg's ``i + 1``, so it
read blocks 4/7/10, one deeper than CLIPSeg: not reproduced).

A local BiomedCLIP directory (the hub repo's files) holds ``open_clip_config.json``, the weights
``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors`` and the BERT tokenizer files. The
BERT architecture is taken from ``text_cfg.hf_model_config`` if present, else ``text_config.json``
in the directory, else inferred from the weight shapes (heads = width / 64, BERT-base's ratio).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from segicl.vlsm.clipseg import CLIPSegStyleNet, clipseg_config
from segicl.vlsm.towers import CLIP_MEAN, CLIP_STD, HFBertTextTower, TimmVisual, TimmViTTower

DECODER_DEFAULTS = {
    "extract_layers": [3, 6, 9],
    "reduce_dim": 64,
    "conditional_layer": 0,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 2048,
    "use_complex_transposed_convolution": True,
}
# BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's architecture (open_clip_config.json + PubMedBERT base),
# for parameter counts without weights.
BIOMEDCLIP_ARCH = {
    "embed_dim": 512,
    "vision": {"model_name": "vit_base_patch16_224", "image_size": 224, "trunk_kwargs": {}},
    "text": {
        "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2},
        "proj_type": "mlp", "pooler_type": "cls_last_hidden_state_pooler", "context_length": 256,
    },
}
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


class BiomedCLIPEncoders(nn.Module):
    """BiomedCLIP's two towers with open_clip's state-dict layout (``visual.*``, ``text.*``, ``logit_scale``).

    Args:
        embed_dim: joint embedding width (512).
        vision: ``model_name`` (timm), ``image_size``, optional ``trunk_kwargs`` (tiny presets).
        text: ``bert`` (a ``BertConfig`` dict), ``proj_type`` ("mlp"), ``pooler_type``, ``context_length``.
    """

    def __init__(self, embed_dim: int, vision: dict, text: dict):
        super().__init__()
        from open_clip.hf_model import HFTextEncoder
        from transformers import BertConfig

        self.visual = TimmVisual(
            vision.get("model_name", "vit_base_patch16_224"), embed_dim, int(vision.get("image_size", 224)),
            vision.get("trunk_kwargs") or None,
        )
        self.text = HFTextEncoder(
            "bert", output_dim=embed_dim, config=BertConfig(**text["bert"]),
            pooler_type=text.get("pooler_type", "cls_last_hidden_state_pooler"),
            proj_type=text.get("proj_type", "mlp"), pretrained=False,
        )
        self.text.transformer.pooler = None  # BiomedCLIP pools the CLS hidden state; no BERT pooler weights
        self.logit_scale = nn.Parameter(torch.tensor(4.6052))


def _infer_bert_config(state: dict[str, torch.Tensor], prefix: str = "text.transformer.") -> dict:
    """BERT config from weight shapes (heads = hidden // 64, as in BERT-base)."""
    emb = state[prefix + "embeddings.word_embeddings.weight"]
    layers = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"encoder\.layer\.(\d+)\.", k))}
    hidden = emb.shape[1]
    return {
        "vocab_size": emb.shape[0],
        "hidden_size": hidden,
        "num_hidden_layers": len(layers),
        "num_attention_heads": max(hidden // 64, 1),
        "intermediate_size": state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0],
        "max_position_embeddings": state[prefix + "embeddings.position_embeddings.weight"].shape[0],
        "type_vocab_size": state[prefix + "embeddings.token_type_embeddings.weight"].shape[0],
    }


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_biomedclip(path: str | Path) -> tuple[BiomedCLIPEncoders, object, dict]:
    """Load a local BiomedCLIP directory -> (encoders, tokenizer, arch)."""
    from segicl.vlsm.tokenizers import has_tokenizer_files, load_tokenizer

    path = Path(path)
    cfg_file = path / "open_clip_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no open_clip_config.json (not an open_clip BiomedCLIP checkpoint)")
    model_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    model_cfg = model_cfg.get("model_cfg", model_cfg)
    weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{path}: none of the weight files {WEIGHT_FILES}")
    state = _read_state(weights)
    vcfg, tcfg = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    if "timm_model_name" not in vcfg:
        raise ValueError(f"{cfg_file}: BiomedCLIP's vision tower is a timm ViT (vision_cfg.timm_model_name)")
    if tcfg.get("hf_model_config"):
        bert = dict(tcfg["hf_model_config"])
    elif (path / "text_config.json").is_file():
        bert = json.loads((path / "text_config.json").read_text(encoding="utf-8"))
    else:
        bert = _infer_bert_config(state)
    arch = {
        "embed_dim": int(model_cfg["embed_dim"]),
        "vision": {"model_name": vcfg["timm_model_name"], "image_size": int(vcfg.get("image_size", 224)),
                   "trunk_kwargs": vcfg.get("timm_model_kwargs") or {}},
        "text": {"bert": bert, "proj_type": tcfg.get("hf_proj_type", "mlp"),
                 "pooler_type": tcfg.get("hf_pooler_type", "cls_last_hidden_state_pooler"),
                 "context_length": int(tcfg.get("context_length", 256))},
    }
    enc = BiomedCLIPEncoders(arch["embed_dim"], arch["vision"], arch["text"])
    state = {k: v for k, v in state.items() if not k.endswith("position_ids") and ".pooler." not in k}
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights}: BiomedCLIP weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    tok_dir = path if has_tokenizer_files(path) else path / "tokenizer"
    if not has_tokenizer_files(tok_dir):
        raise FileNotFoundError(f"{path}: no BERT tokenizer files (vocab.txt / tokenizer.json)")
    return enc, load_tokenizer(tok_dir), arch


def _decoder_from(source: str | Path, width: int, embed_dim: int, patch: int) -> tuple[nn.Module, dict]:
    """The decoder of a CLIPSeg checkpoint: a transformers dir or a saved segicl VLSM (clipseg)."""
    source = Path(source)
    meta_file = source / "config.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{source}: no config.json (need a CLIPSeg checkpoint for BiomedCLIPSeg-D)")
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    if meta.get("format") == "segicl-vlsm":
        from segicl.vlsm.registry import load_vlsm

        vlsm = load_vlsm(source)
        if vlsm.model_name != "clipseg":
            raise ValueError(f"{source}: holds a {vlsm.model_name}, BiomedCLIPSeg-D needs a clipseg decoder")
        decoder, cfg = vlsm.net.head.decoder, vlsm.net.head.decoder.config
    else:
        from transformers import CLIPSegForImageSegmentation

        hf = CLIPSegForImageSegmentation.from_pretrained(str(source))
        decoder, cfg = hf.decoder, hf.config
    if cfg.vision_config.hidden_size != width or cfg.projection_dim != embed_dim or cfg.vision_config.patch_size != patch:
        raise ValueError(
            f"{source}: CLIPSeg decoder expects ViT width {cfg.vision_config.hidden_size}, conditioning "
            f"{cfg.projection_dim}, patch {cfg.vision_config.patch_size}; BiomedCLIP has {width}, {embed_dim}, {patch}"
        )
    return decoder, {k: cfg.to_dict()[k] for k in DECODER_DEFAULTS}


def _build(cfg: dict, decoder_source: str | Path | None) -> tuple[CLIPSegStyleNet, object, dict]:
    from transformers.models.clipseg.modeling_clipseg import CLIPSegDecoder

    from segicl.vlsm.tokenizers import bert_tokenizer

    if cfg.get("pretrained"):
        enc, tokenizer, arch = load_biomedclip(cfg["pretrained"])
    else:
        arch = json.loads(json.dumps(cfg.get("arch") or {}))
        if not arch.get("vision") or not arch.get("text"):
            raise ValueError("biomedclipseg needs 'pretrained' (a BiomedCLIP dir) or an 'arch' with vision/text blocks")
        tokenizer = bert_tokenizer()
        arch["text"]["bert"].setdefault("vocab_size", len(tokenizer))
        enc = BiomedCLIPEncoders(int(arch["embed_dim"]), arch["vision"], arch["text"])
    vision, text = TimmViTTower(enc.visual), HFBertTextTower(enc.text)
    text.max_length = min(text.max_length, int(arch["text"].get("context_length", text.max_length)))
    if decoder_source:
        decoder, dec_arch = _decoder_from(decoder_source, vision.width, vision.proj_dim, vision.patch_size)
    else:
        # The decoder reads only the vision width and patch size from vision_config (the heads of
        # the vision config are unused by CLIPSegDecoder; 1 keeps the config valid for any width).
        dec_arch = {**DECODER_DEFAULTS, **(arch.get("decoder") or cfg.get("decoder") or {})}
        dec_cfg = clipseg_config({
            **dec_arch, "projection_dim": vision.proj_dim,
            "vision_config": {"hidden_size": vision.width, "patch_size": vision.patch_size, "num_attention_heads": 1},
        })
        dec_cfg.vision_config._attn_implementation = "sdpa"  # the decoder layers copy the vision config
        decoder = CLIPSegDecoder._from_config(dec_cfg)
    arch["decoder"] = dec_arch
    net = CLIPSegStyleNet(
        encoders=enc, vision_tower=vision, text_tower=text, decoder=decoder,
        extract_layers=list(dec_arch["extract_layers"]), eos_token_id=None,
        mean=cfg.get("image_mean", CLIP_MEAN), std=cfg.get("image_std", CLIP_STD),
    )
    return net, tokenizer, arch


def build_biomedclipseg(cfg: dict) -> tuple[CLIPSegStyleNet, object, dict]:
    """BiomedCLIP encoders + randomly initialised CLIPSeg decoder (``cfg["decoder"]`` overrides its shape)."""
    return _build(cfg, None)


def build_biomedclipseg_d(cfg: dict) -> tuple[CLIPSegStyleNet, object, dict]:
    """BiomedCLIP encoders + the decoder of the CLIPSeg checkpoint ``cfg["decoder_from"]``.

    Without ``decoder_from`` (tiny tests, or a reload whose weights come from the saved file) the
    decoder is built with the CLIPSeg shape and random weights.
    """
    return _build(cfg, cfg.get("decoder_from"))
