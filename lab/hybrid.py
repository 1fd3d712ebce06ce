"""The evaluated hybrid of the generative transformer and collaborative filtering.

The two models draw on different evidence (EASE on co-occurrence, the transformer on order).
Fitting picks ``alpha`` of :func:`inference.hybrid.mix` on validation NDCG@10 only; 0 and 1 are in
the grid, so the hybrid falls back to a single component when mixing does not help.
:func:`fit_retrieval` picks the cold-start retrieval's weight and history threshold
(:mod:`inference.retrieval`) on the validation targets of short history prefixes, the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.hybrid import blend, mix
from inference.retrieval import RetrievalConfig, TextRetrieval
from inference.scoring import CatalogScorer
from lab.baselines import Ranker
from lab.protocol import Split, metrics_from_ranks, target_ranks

__all__ = ["ALPHAS", "FIT_PREFIXES", "RETRIEVAL_WEIGHTS", "Hybrid", "fit_retrieval"]

ALPHAS = tuple(round(a, 1) for a in np.linspace(0.0, 1.0, 11))
RETRIEVAL_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)
FIT_PREFIXES = (1, 2, 3, 4, 5)  # retrieval's threshold is one past the longest prefix it serves


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


def fit_retrieval(
    model: CatalogScorer,
    retrieval: TextRetrieval,
    split: Split,
    weights: Sequence[float] = RETRIEVAL_WEIGHTS,
    prefixes: Sequence[int] = FIT_PREFIXES,
) -> RetrievalConfig:
    """Retrieval's weight and threshold for ``model``, chosen on validation NDCG@10.

    Each validation user's history is cut to its first ``n`` training items for every ``n`` in
    ``prefixes``; for each weight, retrieval serves the prefixes shorter than a threshold, and
    the pair (weight, threshold) with the largest summed NDCG@10 gain over the model alone wins.
    No gain anywhere leaves retrieval off (weight 0). Full histories, longer than every prefix,
    are untouched whatever is chosen.
    """
    targets = split.targets("valid")
    ndcg: dict[tuple[int, float], float] = {}
    for n in prefixes:
        hist, rows = split.prefix_histories("valid", n)
        if not hist:
            continue
        base, text = model.score(hist), retrieval.score(hist)
        for w in weights:
            scores = base if w == 0.0 else blend(base, text, w)
            ranks = target_ranks(scores, hist, targets[rows])
            ndcg[n, w] = metrics_from_ranks(ranks)["ndcg@10"]
    best, best_gain = RetrievalConfig(), 0.0
    fitted = sorted({n for n, _ in ndcg})
    for w in (w for w in weights if w > 0.0):
        gain = 0.0
        for n in fitted:
            gain += ndcg[n, w] - ndcg[n, 0.0]
            if gain > best_gain + 1e-12:
                best, best_gain = RetrievalConfig(weight=float(w), max_history=n + 1), gain
    record = {f"prefix{n}_w{w}": v for (n, w), v in sorted(ndcg.items())}
    return RetrievalConfig(best.weight, best.max_history, valid_ndcg=record)
