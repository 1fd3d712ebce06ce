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
from typing import Any

import numpy as np
import scipy.sparse as sp

from inference.popularity import Popularity
from inference.scoring import CatalogScorer, EaseScorer, ItemKNNScorer, top_k_unseen
from lab.protocol import Split, stage_ndcg_per_user

__all__ = [
    "DEFAULT_EASE_MAX_ITEMS",
    "EASE",
    "ItemKNN",
    "PopularityRanker",
    "Ranker",
    "interaction_matrix",
    "tune",
    "validation_ndcg",
    "validation_ndcg_per_user",
]


DEFAULT_EASE_MAX_ITEMS = 10_000  # items EASE solves for: a dense float32 inverse of this size
TUNE_USERS = 5_000  # validation users that judge each grid point


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


class ItemKNN(ItemKNNScorer, Ranker):
    """Recency-weighted item-kNN over cosine similarity of item columns, kept sparse.

    The cosine matrix is built from the sparse co-occurrence counts (no items x items dense
    array), and each source item keeps its ``k_neighbours`` most similar items. The unpruned
    similarities are kept after the first fit on a split, so tuning ``k_neighbours`` re-prunes
    instead of recomputing them. Scoring is the served
    :class:`~inference.scoring.ItemKNNScorer`'s.
    """

    name = "itemknn"

    def __init__(self, k_neighbours: int = 100, decay: float = 0.9) -> None:
        self.k_neighbours = k_neighbours
        self.decay = decay
        self._full: sp.csr_matrix | None = None
        self._full_of: Split | None = None
        self._pruned_k = -1

    def params(self) -> dict[str, float]:
        return {"k_neighbours": self.k_neighbours, "decay": self.decay}

    def fit(self, split: Split) -> ItemKNN:
        self.n_items = split.n_items
        if self._full is None or self._full_of is not split:
            self._full, self._full_of = cosine_similarity(interaction_matrix(split)), split
            self._pruned_k = -1
        if self._pruned_k != self.k_neighbours:  # the decay grid needs no new neighbours
            self.sim = top_k_per_row(self._full, self.k_neighbours)
            self._pruned_k = self.k_neighbours
        return self

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The neighbour table (CSR, rows = source items) for an artifact."""
        sim = self.sim.astype(np.float32).tocsr()
        sim.sort_indices()
        return {
            "itemknn.data": sim.data.astype(np.float32),
            "itemknn.indices": sim.indices.astype(np.int32),
            "itemknn.indptr": sim.indptr.astype(np.int64),
        }


def cosine_similarity(x: sp.csr_matrix) -> sp.csr_matrix:
    """Cosine similarity of the item columns of ``x`` (sparse, diagonal removed)."""
    co = (x.T @ x).tocsr().astype(np.float32)
    norms = np.sqrt(co.diagonal()).astype(np.float32)
    norms[norms == 0] = 1.0
    inv = sp.diags(1.0 / norms)
    sim = (inv @ co @ inv).tocsr()
    sim.setdiag(0.0)
    sim.eliminate_zeros()
    return sim


def top_k_per_row(mat: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Each row's ``k`` largest entries (ties broken by column), the rest dropped."""
    mat = mat.tocsr()
    counts = np.diff(mat.indptr)
    if counts.size == 0 or counts.max() <= k:
        return mat.copy()
    rows = np.repeat(np.arange(mat.shape[0]), counts)
    order = np.lexsort((mat.indices, -mat.data, rows))
    rank = np.arange(mat.nnz) - np.repeat(mat.indptr[:-1], counts)
    keep = order[rank < k]
    out = sp.csr_matrix(
        (mat.data[keep], (rows[keep], mat.indices[keep])), shape=mat.shape, dtype=mat.dtype
    )
    out.sort_indices()
    return out


class EASE(EaseScorer, Ranker):
    """EASE fitted in closed form on the training split, with its Markov transitions.

    The item-item weights are solved for the ``max_items`` most frequent training items only
    (all of them when the catalog is smaller): the closed form inverts a dense matrix of that
    size, which is what bounds memory and time on a large catalog; rarer items get no EASE
    weight (their Markov term and the fused models still score them). The Gram matrix is built
    once per split and each ``lam`` costs one Cholesky inverse (float32) of the bounded matrix.
    Scoring is the served :class:`~inference.scoring.EaseScorer`'s.
    """

    name = "ease"

    def __init__(
        self,
        lam: float = 200.0,
        decay: float = 1.0,
        beta: float = 0.0,
        markov_last: int = 3,
        max_items: int = DEFAULT_EASE_MAX_ITEMS,
    ) -> None:
        self.lam = lam
        self.decay = decay
        self.beta = beta
        self.markov_last = markov_last
        self.max_items = max_items
        self._gram: np.ndarray | None = None
        self._gram_of: Split | None = None
        self._solved_lam: float | None = None

    def params(self) -> dict[str, float]:
        return {
            "lam": self.lam,
            "decay": self.decay,
            "beta": self.beta,
            "markov_last": self.markov_last,
            "max_items": self.max_items,
        }

    def fit(self, split: Split) -> EASE:
        self.n_items = split.n_items
        if self._gram is None or self._gram_of is not split:
            x = interaction_matrix(split)
            counts = np.asarray(x.sum(axis=0)).ravel()
            if self.max_items < split.n_items:
                # Most frequent first, ties by index; kept in index order.
                order = np.lexsort((np.arange(split.n_items), -counts))
                self.kept = np.sort(order[: self.max_items])
            else:
                self.kept = np.arange(split.n_items)
            sub = x[:, self.kept]
            self._gram = np.asarray((sub.T @ sub).toarray(), dtype=np.float32)
            self._gram_of = split
            self.trans = transitions(split)
            self._solved_lam = None
        if self._solved_lam != self.lam:  # a refit at the same lam keeps its inverse
            self._solve()
        return self

    def _solve(self) -> None:
        from scipy.linalg import lapack

        assert self._gram is not None
        g = self._gram.copy()
        g[np.diag_indices_from(g)] += np.float32(self.lam)
        # G + lam*I is symmetric positive definite: a Cholesky inverse costs half an LU one.
        chol, info = lapack.spotrf(g, lower=1, overwrite_a=1)
        if info != 0:
            raise ValueError(f"EASE: Cholesky failed ({info}); raise lam")
        p, info = lapack.spotri(chol, lower=1, overwrite_c=1)
        if info != 0:
            raise ValueError(f"EASE: inverse failed ({info})")
        p = np.tril(p) + np.tril(p, -1).T  # spotri fills the lower triangle only
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        self.block = b.astype(np.float32)
        self._solved_lam = self.lam

    def _item_scores(self, w: sp.csr_matrix) -> np.ndarray:
        if self._solved_lam != self.lam:
            self._solve()
        part = np.asarray(w[:, self.kept] @ self.block, dtype=np.float32)
        if len(self.kept) == self.n_items:
            return part
        out = np.zeros((w.shape[0], self.n_items), dtype=np.float32)
        out[:, self.kept] = part
        return out

    def to_arrays(self, top_k: int) -> dict[str, np.ndarray]:
        """The fitted model as sparse arrays for an artifact.

        ``ease.*``: the item-item weights in CSC layout over the whole catalog, each column
        (target item) pruned to the ``top_k`` source items of largest ``|w|``; ``top_k`` at
        least the number of solved items keeps every non-zero weight, so the scores are those of
        the fitted model. ``markov.*``: the transition matrix in CSR layout, exact.
        """
        if self._solved_lam != self.lam:
            self._solve()
        block = self.block
        m = block.shape[0]
        if top_k < m:
            keep = np.argpartition(-np.abs(block), top_k - 1, axis=0)[:top_k]
            cols = np.broadcast_to(np.arange(m), keep.shape)
            vals = block[keep, cols]
            rows_, cols_ = keep.ravel(), cols.ravel()
        else:
            rows_, cols_ = np.nonzero(block)
            vals = block[rows_, cols_]
        n = self.n_items
        pruned = sp.csc_matrix(
            (np.ravel(vals), (self.kept[rows_], self.kept[cols_])), shape=(n, n), dtype=np.float32
        )
        pruned.eliminate_zeros()
        pruned.sort_indices()
        trans = sp.csr_matrix(self.trans, dtype=np.float32)
        trans.sort_indices()
        return {
            "ease.data": pruned.data.astype(np.float32),
            "ease.indices": pruned.indices.astype(np.int32),
            "ease.indptr": pruned.indptr.astype(np.int64),
            "markov.data": trans.data.astype(np.float32),
            "markov.indices": trans.indices.astype(np.int32),
            "markov.indptr": trans.indptr.astype(np.int64),
        }

    @property
    def weights(self) -> np.ndarray:
        """The dense item-item weights over the whole catalog (small catalogs and tests)."""
        if self._solved_lam != self.lam:
            self._solve()
        out = np.zeros((self.n_items, self.n_items), dtype=np.float32)
        out[np.ix_(self.kept, self.kept)] = self.block
        return out

    @weights.setter
    def weights(self, value: Any) -> None:  # EaseScorer.__init__ is not used by the lab model
        raise AttributeError("the fitted EASE's weights come from fit()")


def transitions(split: Split) -> sp.csr_matrix:
    """Row-normalised first-order transition frequencies of the training sequences (sparse)."""
    src = np.concatenate([s[:-1] for s in split.train if len(s) > 1] or [np.empty(0, np.int64)])
    dst = np.concatenate([s[1:] for s in split.train if len(s) > 1] or [np.empty(0, np.int64)])
    n = split.n_items
    counts = sp.csr_matrix(
        (np.ones(len(src), dtype=np.float32), (src, dst)), shape=(n, n), dtype=np.float32
    )
    counts.sum_duplicates()
    rowsum = np.asarray(counts.sum(axis=1)).ravel()
    rowsum[rowsum == 0] = 1.0
    out: sp.csr_matrix = sp.diags(1.0 / rowsum).astype(np.float32) @ counts
    return out.tocsr()


def validation_ndcg(model: Ranker, split: Split, max_users: int | None = None) -> float:
    """NDCG@10 on the validation targets (the only number hyper-parameters may be tuned on).

    ``max_users`` judges an evenly spaced sample of that many validation users (all of them
    when there are fewer), which is what keeps tuning short on a large dataset.
    """
    return float(np.mean(validation_ndcg_per_user(model, split, max_users)))


def validation_ndcg_per_user(
    model: CatalogScorer, split: Split, max_users: int | None = None
) -> np.ndarray:
    """Each judged validation user's NDCG@10 (the users :func:`validation_ndcg` averages)."""
    return stage_ndcg_per_user(model, split, "valid", max_users=max_users)


def tune(
    model: Ranker,
    split: Split,
    grid: dict[str, Sequence[float]],
    say: Callable[[str], None] = lambda _: None,
    *,
    max_users: int | None = TUNE_USERS,
    progress: bool = False,
) -> dict[str, float]:
    """Grid-search ``grid`` (attribute -> values) on validation NDCG@10; leave the best set.

    Work is shared across grid points: EASE's Gram matrix and item-kNN's similarities are built
    once per split, EASE re-solves only when ``lam`` changes (put it first in ``grid``) and
    item-kNN only re-prunes its neighbours. ``max_users`` caps the validation users each point
    is judged on (see :func:`validation_ndcg`); the chosen set is what is returned.
    """
    from tqdm import tqdm

    best: tuple[float, dict[str, float]] = (-1.0, {})
    names = list(grid)
    fitted = False
    points = list(itertools.product(*(grid[n] for n in names)))
    for values in tqdm(points, desc=f"tune {model.name}", disable=not progress, unit="point"):
        params = dict(zip(names, values, strict=True))
        for n, v in params.items():
            setattr(model, n, v)
        # Models whose fit depends on a parameter refit; EASE re-solves lazily on lam change.
        if not fitted or "k_neighbours" in params:
            model.fit(split)
            fitted = True
        ndcg = validation_ndcg(model, split, max_users)
        say(f"  {model.name} {params} valid ndcg@10={ndcg:.4f}")
        if ndcg > best[0]:
            best = (ndcg, params)
    for n, v in best[1].items():
        setattr(model, n, v)
    if "k_neighbours" in best[1]:
        model.fit(split)
    return {**best[1], "valid_ndcg@10": best[0]}
