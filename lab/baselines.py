"""Collaborative-filtering baselines behind the lab's ranking interface, :class:`Ranker`.

Every model scores the whole catalog for a batch of histories (item-index arrays, oldest first)
and :meth:`Ranker.recommend` turns those scores into the top ``k`` unseen items. Because the
answer is a position in the score vector, no model can return an item outside the catalog.

- ``pop``: most popular in the training data (the served ``inference.popularity.Popularity``).
- ``itemknn``: item-kNN on cosine similarity of the user-item matrix, each history item weighted
  by recency (``decay ** age``), neighbours cut at ``k_neighbours``.
- ``ease``: EASE (Steck 2019, a closed-form item-item linear model) with the same recency weights,
  mixed with a first-order Markov term (next-item transition frequencies from the last few
  items). All hyper-parameters are tuned on validation NDCG@10 only. For serving, the fitted
  model exports its item-item weights pruned to the largest ``top_k`` per column and its
  transition matrix as sparse arrays (:meth:`EASE.to_arrays`); serving scores from them with
  ``inference.scoring.EaseScorer``, through the same ``ease_scores`` as the fitted model.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from inference.popularity import Popularity
from inference.scoring import EaseScorer, recency_weights, top_k_unseen
from lab.protocol import Split, metrics_from_ranks, target_ranks

__all__ = [
    "EASE",
    "ItemKNN",
    "PopularityRanker",
    "Ranker",
    "interaction_matrix",
    "tune",
    "validation_ndcg",
]


class Ranker(ABC):
    """Scores the catalog for histories of item indices; recommends the top unseen items."""

    name: str = "model"
    n_items: int = 0

    @abstractmethod
    def fit(self, split: Split) -> Ranker:
        """Learn from ``split.train`` (the validation and test items stay unseen)."""

    @abstractmethod
    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """``(len(histories), n_items)`` float32 scores; higher is better."""

    def recommend(
        self, histories: Sequence[np.ndarray], k: int, batch_size: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` item indices and scores per history, seen items excluded, best first."""
        ids, vals = [], []
        for start in range(0, len(histories), batch_size):
            chunk = histories[start : start + batch_size]
            scores = self.score(chunk)
            top, top_scores = top_k_unseen(scores, chunk, k)
            ids.append(top)
            vals.append(top_scores)
        if not ids:
            return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=np.float32)
        return np.concatenate(ids), np.concatenate(vals)


def interaction_matrix(split: Split) -> sp.csr_matrix:
    """Binary users x items matrix of the training data."""
    rows = np.concatenate([np.full(len(s), u) for u, s in enumerate(split.train)])
    cols = np.concatenate(split.train)
    data = np.ones(len(cols), dtype=np.float32)
    mat = sp.csr_matrix((data, (rows, cols)), shape=(len(split.train), split.n_items))
    mat.data[:] = 1.0  # repeats count once
    return mat


class PopularityRanker(Ranker):
    """The ``pop`` baseline: the served :class:`~inference.popularity.Popularity` over indices."""

    name = "pop"

    def fit(self, split: Split) -> PopularityRanker:
        self.n_items = split.n_items
        counts = np.bincount(np.concatenate(split.train), minlength=split.n_items)
        self.model = Popularity(dict(zip(split.item_ids, counts.tolist(), strict=True)))
        self.counts = np.asarray(
            [self.model.counts[item] for item in split.item_ids], dtype=np.float32
        )
        return self

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.tile(self.counts, (len(histories), 1))


class ItemKNN(Ranker):
    """Recency-weighted item-kNN over cosine similarity of item columns."""

    name = "itemknn"

    def __init__(self, k_neighbours: int = 100, decay: float = 0.9) -> None:
        self.k_neighbours = k_neighbours
        self.decay = decay

    def params(self) -> dict[str, float]:
        return {"k_neighbours": self.k_neighbours, "decay": self.decay}

    def fit(self, split: Split) -> ItemKNN:
        self.n_items = split.n_items
        x = interaction_matrix(split)
        co = (x.T @ x).toarray().astype(np.float32)
        norms = np.sqrt(np.diag(co)).copy()
        norms[norms == 0] = 1.0
        sim = co / norms[:, None] / norms[None, :]
        np.fill_diagonal(sim, 0.0)
        if self.k_neighbours < self.n_items:
            # Keep each item's k most similar neighbours (rows: source item).
            cut = np.argpartition(-sim, self.k_neighbours - 1, axis=1)[:, self.k_neighbours :]
            np.put_along_axis(sim, cut, 0.0, axis=1)
        self.sim = sim
        return self

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        w = recency_weights(histories, self.n_items, self.decay)
        return np.asarray(w @ self.sim, dtype=np.float32)


class EASE(EaseScorer, Ranker):
    """EASE fitted in closed form on the training split, with its Markov transitions.

    Scoring is the served :class:`~inference.scoring.EaseScorer`'s, on the dense weights.
    """

    name = "ease"

    def __init__(
        self, lam: float = 200.0, decay: float = 1.0, beta: float = 0.0, markov_last: int = 3
    ) -> None:
        self.lam = lam
        self.decay = decay
        self.beta = beta
        self.markov_last = markov_last
        self._gram: np.ndarray | None = None

    def params(self) -> dict[str, float]:
        return {"lam": self.lam, "decay": self.decay, "beta": self.beta}

    def fit(self, split: Split) -> EASE:
        self.n_items = split.n_items
        if self._gram is None:
            x = interaction_matrix(split)
            self._gram = (x.T @ x).toarray().astype(np.float64)
            trans = np.zeros((split.n_items, split.n_items), dtype=np.float32)
            for seq in split.train:
                if len(seq) > 1:
                    np.add.at(trans, (seq[:-1], seq[1:]), 1.0)
            rowsum = trans.sum(axis=1, keepdims=True)
            rowsum[rowsum == 0] = 1.0
            self.trans = trans / rowsum
        self._solve()
        return self

    def _solve(self) -> None:
        assert self._gram is not None
        g = self._gram.copy()
        g[np.diag_indices_from(g)] += self.lam
        p = np.linalg.inv(g)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        self.weights = b.astype(np.float32)
        self._solved_lam = self.lam

    def to_arrays(self, top_k: int) -> dict[str, np.ndarray]:
        """The fitted model as sparse arrays for an artifact.

        ``ease.*``: the item-item weights in CSC layout, each column (target item) pruned to the
        ``top_k`` source items of largest ``|w|``; ``top_k >= n_items`` keeps every non-zero
        weight, so the scores are those of the dense model. ``markov.*``: the transition matrix
        in CSR layout, exact.
        """
        if self._solved_lam != self.lam:
            self._solve()
        weights = np.asarray(self.weights, dtype=np.float32)
        n = weights.shape[0]
        if top_k < n:
            keep = np.argpartition(-np.abs(weights), top_k - 1, axis=0)[:top_k]
            cols = np.broadcast_to(np.arange(n), keep.shape)
            vals = weights[keep, cols]
            pruned = sp.csc_matrix(
                (vals.ravel(), (keep.ravel(), cols.ravel())), shape=(n, n), dtype=np.float32
            )
        else:
            pruned = sp.csc_matrix(weights)
        pruned.eliminate_zeros()
        pruned.sort_indices()
        trans = sp.csr_matrix(np.asarray(self.trans, dtype=np.float32))
        trans.sort_indices()
        return {
            "ease.data": pruned.data.astype(np.float32),
            "ease.indices": pruned.indices.astype(np.int32),
            "ease.indptr": pruned.indptr.astype(np.int64),
            "markov.data": trans.data.astype(np.float32),
            "markov.indices": trans.indices.astype(np.int32),
            "markov.indptr": trans.indptr.astype(np.int64),
        }

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self._solved_lam != self.lam:
            self._solve()
        return super().score(histories)


def validation_ndcg(model: Ranker, split: Split) -> float:
    """NDCG@10 on the validation targets (the only number hyper-parameters may be tuned on)."""
    hist, targets = split.histories("valid"), split.targets("valid")
    parts = [
        target_ranks(model.score(hist[s : s + 512]), hist[s : s + 512], targets[s : s + 512])
        for s in range(0, len(hist), 512)
    ]
    ranks = np.concatenate(parts)
    return metrics_from_ranks(ranks)["ndcg@10"]


def tune(
    model: Ranker,
    split: Split,
    grid: dict[str, Sequence[float]],
    say: Callable[[str], None] = lambda _: None,
) -> dict[str, float]:
    """Grid-search ``grid`` (attribute -> values) on validation NDCG@10; leave the best set."""
    best: tuple[float, dict[str, float]] = (-1.0, {})
    names = list(grid)
    fitted = False
    for values in itertools.product(*(grid[n] for n in names)):
        params = dict(zip(names, values, strict=True))
        for n, v in params.items():
            setattr(model, n, v)
        # Models whose fit depends on a parameter refit; EASE re-solves lazily on lam change.
        if not fitted or "k_neighbours" in params:
            model.fit(split)
            fitted = True
        ndcg = validation_ndcg(model, split)
        say(f"  {model.name} {params} valid ndcg@10={ndcg:.4f}")
        if ndcg > best[0]:
            best = (ndcg, params)
    for n, v in best[1].items():
        setattr(model, n, v)
    if "k_neighbours" in best[1]:
        model.fit(split)
    return {**best[1], "valid_ndcg@10": best[0]}
