"""The evaluated hybrid of the generative transformer and collaborative filtering.

The two models draw on different evidence (EASE on co-occurrence, the transformer on order).
Fitting picks ``alpha`` of :func:`inference.hybrid.mix` on validation NDCG@10 only; 0 and 1 are in
the grid, so the hybrid falls back to a single component when mixing does not help.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.hybrid import mix
from inference.scoring import CatalogScorer
from lab.baselines import Ranker
from lab.protocol import Split, metrics_from_ranks, target_ranks

__all__ = ["ALPHAS", "Hybrid"]

ALPHAS = tuple(round(a, 1) for a in np.linspace(0.0, 1.0, 11))


class Hybrid(Ranker):
    """Per-user standardised score fusion of a CF model and the generative model."""

    def __init__(self, cf: CatalogScorer, gen: CatalogScorer, alpha: float = 0.5) -> None:
        if cf.n_items and gen.n_items and cf.n_items != gen.n_items:
            raise ValueError("both components must score the same catalog")
        self.cf, self.gen, self.alpha = cf, gen, alpha
        self.n_items = cf.n_items or gen.n_items
        self.name = f"{gen.name}+{cf.name}"
        self.valid_ndcg: dict[float, float] = {}

    def fit(self, split: Split) -> Hybrid:
        """The components are fitted already; fitting the hybrid picks ``alpha`` on validation."""
        hist, targets = split.histories("valid"), split.targets("valid")
        cf, gen = self.cf.score(hist), self.gen.score(hist)
        self.valid_ndcg = {
            alpha: metrics_from_ranks(target_ranks(mix(cf, gen, alpha), hist, targets))["ndcg@10"]
            for alpha in ALPHAS
        }
        self.alpha = max(self.valid_ndcg, key=lambda a: self.valid_ndcg[a])
        return self

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return mix(self.cf.score(histories), self.gen.score(histories), self.alpha)
