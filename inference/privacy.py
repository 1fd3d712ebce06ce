"""Differential privacy for user-profile embeddings that leave the process (the Gaussian mechanism).

A profile embedding summarises what a user watched. Before one is published (to a topic, a cache,
another service) it is clipped to L2 norm ``C`` and Gaussian noise is added to every coordinate
with standard deviation::

    sigma = C * sqrt(2 * ln(1.25 / delta)) / epsilon

This is the classic Gaussian mechanism (Dwork & Roth, Theorem A.1) with L2 sensitivity ``C``:
any two inputs of one user whose clipped vectors differ by at most ``C`` in L2 norm (e.g. a
profile and the same profile with a few items added or removed, or a profile and no profile)
are (epsilon, delta)-indistinguishable. For protection between two *arbitrary* profiles the
sensitivity is ``2C``: set ``sensitivity=2 * clip_norm``. The theorem is proved for
``epsilon < 1``; ``epsilon = 1`` is the conventional boundary and larger values are refused.

Noise is added once per release; releasing the same profile repeatedly composes (budgets add
up), so callers publish a profile only when it changes. Renormalising the noised vector to unit
length afterwards is post-processing and keeps the guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inference.exceptions import InferenceError

__all__ = ["GaussianMechanism", "clip_l2"]

Vectors = npt.NDArray[np.float32]


def clip_l2(vectors: npt.NDArray[np.floating], clip_norm: float) -> npt.NDArray[np.float64]:
    """Scale each row (or the single vector) down to L2 norm at most ``clip_norm``."""
    v = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12))
    result: npt.NDArray[np.float64] = v * scale
    return result


@dataclass(frozen=True, slots=True)
class GaussianMechanism:
    """(epsilon, delta)-DP release of embeddings: clip to ``clip_norm``, add N(0, sigma^2)."""

    epsilon: float = 1.0
    delta: float = 1e-5
    clip_norm: float = 1.0
    sensitivity: float | None = None  # defaults to clip_norm; see the module docstring

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon <= 1.0:
            raise InferenceError(f"epsilon must be in (0, 1], got {self.epsilon}")
        if not 0.0 < self.delta < 1.0:
            raise InferenceError(f"delta must be in (0, 1), got {self.delta}")
        if self.clip_norm <= 0.0 or (self.sensitivity is not None and self.sensitivity <= 0.0):
            raise InferenceError("clip_norm and sensitivity must be positive")

    @property
    def sigma(self) -> float:
        """Standard deviation of the noise on each coordinate."""
        delta_f = self.clip_norm if self.sensitivity is None else self.sensitivity
        return delta_f * math.sqrt(2.0 * math.log(1.25 / self.delta)) / self.epsilon

    def privatize(
        self,
        vectors: npt.NDArray[np.floating],
        rng: np.random.Generator,
        *,
        renormalize: bool = True,
    ) -> Vectors:
        """Clip, add noise and (by default) rescale to unit length; one release per call.

        ``vectors`` is one embedding ``(d,)`` or a batch ``(n, d)``, each row one user's.
        """
        clipped = clip_l2(vectors, self.clip_norm)
        noised = clipped + rng.normal(0.0, self.sigma, size=clipped.shape)
        if renormalize:
            norms = np.linalg.norm(noised, axis=-1, keepdims=True)
            noised = noised / np.maximum(norms, 1e-12)
        result: Vectors = noised.astype(np.float32)
        return result
