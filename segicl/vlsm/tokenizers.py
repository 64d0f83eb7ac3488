"""Text tokenizers that work offline.

* CLIP (CLIPSeg, CRIS): a transformers ``CLIPTokenizer`` built from the BPE merges that open_clip
  ships inside its package. It reproduces OpenAI CLIP's tokenizer id for id (the same
  vocabulary as CIDAS/clipseg-rd64-refined, 49,408 tokens), so tiny models use the real ids and a
  real checkpoint's own tokenizer files are interchangeable with it.
* BERT (BiomedCLIP): a real checkpoint brings its WordPiece files (``vocab.txt`` ...). Tiny models
  get a small WordPiece vocabulary written here: special tokens, characters and their ``##``
  continuations (so any text tokenizes) and the words of this project's prompts.

Both are saved next to the model (``tokenizer/``) and reloaded with ``AutoTokenizer``.
"""

from __future__ import annotations

import gzip
import string
from functools import lru_cache
from pathlib import Path

import torch

from segicl.vlsm.prompts import DEFINITIONS, LOCATIONS, NUMBER_WORDS

CLIP_SOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [CLIP_SOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer():
    """OpenAI CLIP's BPE tokenizer (49,408 ids, SOS 49406, EOS = pad 49407) from open_clip's bundled merges."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges))


def _prompt_words() -> list[str]:
    words: set[str] = set()
    texts = [d for defs in DEFINITIONS.values() for d in defs] + list(DEFINITIONS)
    texts += [w for row in LOCATIONS for w in row] + list(NUMBER_WORDS)
    texts += [
        "a photo of an image located in the which is segment this with",
        "tiny small medium large round oval elongated ring-shaped irregular",
        "white black gray grey red orange brown yellow green blue purple pink bright dark",
        "endoscopy ultrasound mri cardiac breast fetal clinical photography microscopy light blood smear",
        "tumor tumour lesion ulcer polyp head heart cell cells nuclei ventricle left right",
    ]
    for text in texts:
        for w in text.lower().replace(",", " ").replace("-", " - ").split():
            words.add(w)
    return sorted(words)


def tiny_bert_vocab() -> list[str]:
    """WordPiece vocabulary for tiny BERT towers: specials, characters, ##characters, prompt words."""
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + ["##" + c for c in chars]
    vocab += [w for w in _prompt_words() if w not in vocab]
    return vocab


def bert_tokenizer(vocab: list[str] | None = None):
    """A transformers ``BertTokenizer`` (uncased WordPiece) over ``vocab`` (default :func:`tiny_bert_vocab`)."""
    from transformers import BertTokenizer

    tokens = vocab or tiny_bert_vocab()
    return BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)


def load_tokenizer(path: str | Path):
    """Load tokenizer files saved by ``save_pretrained`` (or shipped with a checkpoint)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def has_tokenizer_files(path: str | Path) -> bool:
    p = Path(path)
    return any((p / f).is_file() for f in ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json"))


def tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Texts -> fixed-length ``input_ids`` / ``attention_mask`` (B, max_length) int64, truncated and padded.

    The end token is kept under truncation (the tokenizer adds special tokens after truncating).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    enc = tokenizer(
        [str(t) for t in texts], padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
