"""Support store: embed labelled support images, index them in FAISS, retrieve the nearest ones.

    from retrieval import SupportStore
    store = SupportStore.build(["../shared/data/kvasir_seg"], split="train")   # pixel embedder
    hits = store.search(image, k=3, dataset="kvasir_seg", label="polyp",
                        exclude_stems=[stem], exclude_groups=[group])
    support = hits[0].sample()          # segicl.data.Sample: image + binary mask
    store.save("stores/kvasir"); store = SupportStore.load("stores/kvasir")

Heavy imports (faiss, torch) happen on first use of the store, not at package import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = ["SupportStore", "Hit", "StoreError", "EmbedderMismatchError", "get_embedder", "DEFAULT_EMBEDDER", "Embedder"]

if TYPE_CHECKING:
    from retrieval.embedders import DEFAULT_EMBEDDER, Embedder, get_embedder
    from retrieval.store import EmbedderMismatchError, Hit, StoreError, SupportStore


def __getattr__(name: str):
    if name in ("SupportStore", "Hit", "StoreError", "EmbedderMismatchError"):
        from retrieval import store

        return getattr(store, name)
    if name in ("get_embedder", "DEFAULT_EMBEDDER", "Embedder"):
        from retrieval import embedders

        return getattr(embedders, name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
