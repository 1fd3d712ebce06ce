"""The fusion of the generative transformer and collaborative filtering: one definition.

Each component's catalog scores are standardised per user (zero mean, unit variance), then added
with weights chosen on validation (:func:`fuse`: any of gen, EASE, item-kNN, popularity);
:func:`mix` is its two-part form ``(1 - alpha) * z(cf) + alpha * z(gen)``. The served artifact
(``inference.artifact.ArtifactRecommender``) and the lab's evaluation ``lab.hybrid.Hybrid``, which
picks ``alpha`` on validation, both call :func:`mix`. :func:`blend` adds retrieval's scores for
short histories (``inference.retrieval``) the same way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["blend", "fuse", "mix", "standardise"]


def standardise(scores: np.ndarray) -> np.ndarray:
    """Each row to zero mean and unit variance (a constant row stays 0)."""
    mean = scores.mean(axis=1, keepdims=True)
    std = scores.std(axis=1, keepdims=True)
    out: np.ndarray = (scores - mean) / np.maximum(std, 1e-9)
    return out


def fuse(parts: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """``sum_i weights[i] * z(parts[i])``, each component's score rows standardised per user.

    Components of weight 0 are skipped (and need not be in ``parts``).
    """
    out: np.ndarray | None = None
    for name, weight in weights.items():
        if weight == 0.0:
            continue
        z = float(weight) * standardise(np.asarray(parts[name], dtype=np.float32))
        out = z if out is None else out + z
    if out is None:
        raise ValueError("fusion needs at least one component of non-zero weight")
    return out.astype(np.float32, copy=False)


def mix(cf: np.ndarray, gen: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * z(cf) + alpha * z(gen)``, each score row standardised per user."""
    z_cf = standardise(np.asarray(cf, dtype=np.float32))
    z_gen = standardise(np.asarray(gen, dtype=np.float32))
    return ((1.0 - alpha) * z_cf + alpha * z_gen).astype(np.float32)


def blend(base: np.ndarray, retrieval: np.ndarray, weight: float) -> np.ndarray:
    """``z(base) + weight * z(retrieval)``: the model's scores with retrieval's added.

    Standardising the model's row first keeps its order when ``weight`` is 0, and puts both
    parts on one scale whatever the model (the hybrid's mix, or the transformer's logits).
    """
    z_base = standardise(np.asarray(base, dtype=np.float32))
    z_ret = standardise(np.asarray(retrieval, dtype=np.float32))
    return (z_base + weight * z_ret).astype(np.float32)
