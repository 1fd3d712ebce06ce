"""The fusion of the generative transformer and collaborative filtering: one definition.

Each component's catalog scores are standardised per user (zero mean, unit variance), then mixed:
``(1 - alpha) * z(cf) + alpha * z(gen)``. The served artifact
(``inference.artifact.ArtifactRecommender``) and the lab's evaluation ``lab.hybrid.Hybrid``, which
picks ``alpha`` on validation, both call :func:`mix`. :func:`blend` adds retrieval's scores for
short histories (``inference.retrieval``) the same way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["blend", "mix"]


def _standardise(scores: np.ndarray) -> np.ndarray:
    mean = scores.mean(axis=1, keepdims=True)
    std = scores.std(axis=1, keepdims=True)
    out: np.ndarray = (scores - mean) / np.maximum(std, 1e-9)
    return out


def mix(cf: np.ndarray, gen: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * z(cf) + alpha * z(gen)``, each score row standardised per user."""
    z_cf = _standardise(np.asarray(cf, dtype=np.float32))
    z_gen = _standardise(np.asarray(gen, dtype=np.float32))
    return ((1.0 - alpha) * z_cf + alpha * z_gen).astype(np.float32)


def blend(base: np.ndarray, retrieval: np.ndarray, weight: float) -> np.ndarray:
    """``z(base) + weight * z(retrieval)``: the model's scores with retrieval's added.

    Standardising the model's row first keeps its order when ``weight`` is 0, and puts both
    parts on one scale whatever the model (the hybrid's mix, or the transformer's logits).
    """
    z_base = _standardise(np.asarray(base, dtype=np.float32))
    z_ret = _standardise(np.asarray(retrieval, dtype=np.float32))
    return (z_base + weight * z_ret).astype(np.float32)
