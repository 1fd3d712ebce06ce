"""Scoring the catalog from item-index histories: the pieces serving and the lab share.

A scorer takes histories of catalog indices (oldest first) and returns one score per catalog
item; :func:`top_k_unseen` turns scores into the best unseen items. EASE's scores are defined
once here (:meth:`EaseScorer.score`): the served model scores from the pruned sparse arrays of an
artifact, and the lab's fitted ``EASE`` (a subclass) from its dense weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

__all__ = [
    "Attribution",
    "CatalogScorer",
    "EaseScorer",
    "ItemKNNScorer",
    "PopularityScorer",
    "recency_weights",
    "top_k_unseen",
]


class CatalogScorer(Protocol):
    """Scores every catalog item for histories of item indices."""

    name: str
    n_items: int

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """``(len(histories), n_items)`` float32 scores; higher is better."""
        ...


Attribution = tuple[np.ndarray, np.ndarray]
"""``(items, shares)``: a history's distinct items (catalog indices, ascending) and, per item and
target, its additive share of the target's score minus its mean share over the catalog, divided
by the standard deviation of the user's score row (the units of a standardised score)."""


def _weighted_rows(
    matrix: Any, items: np.ndarray, weight: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``sum_i weight[i] * matrix[items[i]]`` over the catalog, and each item's weighted entries
    in the targets' columns ``(len(items), len(targets))``.

    An artifact's CSR weights are walked as arrays: building scipy matrices per list costs more
    than the arithmetic, and this runs for every published list.
    """
    n_items = int(matrix.shape[1])
    if not (sp.issparse(matrix) and matrix.format == "csr"):
        rows = weight[:, None] * _dense(matrix[items]).astype(np.float64)
        return rows.sum(axis=0), rows[:, targets]
    starts, ends = matrix.indptr[items], matrix.indptr[items + 1]
    lengths = ends - starts
    owner = np.repeat(np.arange(len(items)), lengths)
    entry = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    cols = matrix.indices[entry]
    vals = matrix.data[entry] * weight[owner]
    row = np.bincount(cols, weights=vals, minlength=n_items)
    column = np.full(n_items, -1, dtype=np.int64)
    column[targets] = np.arange(len(targets))
    hit = column[cols] >= 0
    share = np.zeros((len(items), len(targets)))
    share[owner[hit], column[cols[hit]]] = vals[hit]  # a CSR row holds each column once
    return row, share


def _row_means(matrix: Any) -> np.ndarray:
    """Each row's mean over the catalog."""
    return np.asarray(matrix.mean(axis=1), dtype=np.float32).reshape(-1)


class _Derived:
    """Something computed once per item-item matrix and kept for the last few matrices (a
    refitted model has a new matrix, so a stale result is never used)."""

    def __init__(self, derive: Callable[[Any], Any], keep: int = 8) -> None:
        self.derive, self.keep = derive, keep
        self._held: list[tuple[Any, Any]] = []

    def __call__(self, matrix: Any) -> Any:
        for held, derived in self._held:
            if held is matrix:
                return derived
        derived = self.derive(matrix)
        self._held = [(matrix, derived), *self._held[: self.keep - 1]]
        return derived


_ROW_MEANS = _Derived(_row_means)


def _centred(share: np.ndarray, means: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Shares above each item's mean share, in units of the score row's spread."""
    out: np.ndarray = (share - means[:, None]) / max(float(row.std()), 1e-9)
    return out


def top_k_unseen(
    scores: np.ndarray, histories: Sequence[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Mask seen items in place and take the ``k`` best per row (ties broken by item index)."""
    scores = np.asarray(scores, dtype=np.float32)
    for row, hist in enumerate(histories):
        scores[row, np.asarray(hist, dtype=np.int64)] = -np.inf
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)
    top = np.take_along_axis(part, order, axis=1)
    return top.astype(np.int64), np.take_along_axis(scores, top, axis=1)


def _recency(
    history: np.ndarray, decay: float, last: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A history's distinct items (ascending) and their weights ``decay ** age`` (age 0 = newest;
    a repeated item keeps its newest weight); ``last`` keeps only the most recent items."""
    h = np.asarray(history, dtype=np.int64)
    if last is not None:
        h = h[-last:]
    ages = np.arange(len(h) - 1, -1, -1, dtype=np.float64)
    w = decay**ages
    # Reverse so the newest occurrence of a repeated item comes first; np.unique keeps it.
    items, first = np.unique(h[::-1], return_index=True)
    return items, w[::-1][first]


def recency_weights(
    histories: Sequence[np.ndarray], n_items: int, decay: float, last: int | None = None
) -> sp.csr_matrix:
    """Sparse ``(batch, n_items)``: ``decay ** age`` per history item (age 0 = newest).

    A repeated item keeps its newest weight; ``last`` keeps only the most recent items.
    """
    rows, cols, vals = [], [], []
    for r, hist in enumerate(histories):
        items, weights = _recency(hist, decay, last)
        rows.append(np.full(len(items), r))
        cols.append(items)
        vals.append(weights)
    if not rows:
        return sp.csr_matrix((0, n_items), dtype=np.float32)
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(histories), n_items),
        dtype=np.float32,
    )


def _dense(product: Any) -> np.ndarray:
    """A float32 array of a product that is dense (fitted model) or sparse (loaded model)."""
    if sp.issparse(product):
        product = product.toarray()
    return np.asarray(product, dtype=np.float32)


class EaseScorer:
    """EASE with a first-order Markov term, scored from item-item weights and transitions.

    ``score = (w * history) · B / max + beta · (last-items transitions) / max``, each part scaled
    to a maximum of 1 per user so ``beta`` is comparable across datasets. ``B`` and the
    transitions are dense arrays (the lab's fitted model) or sparse matrices (an artifact's
    arrays, written by the lab's ``EASE.to_arrays``).
    """

    name = "ease"

    def __init__(
        self,
        weights: Any,
        trans: Any,
        *,
        lam: float,
        decay: float,
        beta: float,
        markov_last: int,
    ) -> None:
        self.weights: Any = weights
        self.trans: Any = trans
        self.n_items = int(weights.shape[0])
        self.lam, self.decay, self.beta, self.markov_last = lam, decay, beta, markov_last

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, np.ndarray],
        n_items: int,
        *,
        lam: float,
        decay: float,
        beta: float,
        markov_last: int,
    ) -> EaseScorer:
        """The scorer of ``EASE.to_arrays`` output; ``ValueError`` if the arrays disagree."""
        shape = (n_items, n_items)
        try:
            weights = sp.csc_matrix(
                (arrays["ease.data"], arrays["ease.indices"], arrays["ease.indptr"]), shape=shape
            )
            trans = sp.csr_matrix(
                (arrays["markov.data"], arrays["markov.indices"], arrays["markov.indptr"]),
                shape=shape,
            )
            # Sparse constructors trust the arrays; a full check catches out-of-range indices
            # that would otherwise read outside the buffers.
            weights.check_format(full_check=True)
            trans.check_format(full_check=True)
        except KeyError as exc:
            raise ValueError(f"missing array {exc}") from exc
        # Rows are source items: the product with a history's row vector walks CSR rows.
        return cls(
            weights.astype(np.float32).tocsr(),
            trans.astype(np.float32),
            lam=lam,
            decay=decay,
            beta=beta,
            markov_last=markov_last,
        )

    def _item_scores(self, w: sp.csr_matrix) -> np.ndarray:
        """The EASE part before scaling: recency-weighted history times the item weights."""
        return _dense(w @ self.weights)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        w = recency_weights(histories, self.n_items, self.decay)
        s = self._item_scores(w)
        s /= np.maximum(np.abs(s).max(axis=1, keepdims=True), 1e-9)
        if self.beta > 0:
            m = recency_weights(histories, self.n_items, 0.5, last=self.markov_last)
            t = _dense(m @ self.trans)
            t /= np.maximum(t.max(axis=1, keepdims=True), 1e-9)
            s += self.beta * t
        return s

    def attribute(self, history: np.ndarray, targets: np.ndarray) -> Attribution:
        """Each history item's share of ``targets``' scores (see :data:`Attribution`).

        :meth:`score` is a sum over history items (recency weight times the item's row of
        ``B``, and the Markov term's transitions from the newest items), scaled per user, so the
        shares add up to the score exactly.
        """
        items, weight = _recency(history, self.decay)
        raw, share = _weighted_rows(self.weights, items, weight, targets)
        scale = max(float(np.abs(raw).max()), 1e-9)
        share /= scale
        means = weight * _ROW_MEANS(self.weights)[items] / scale
        row = raw / scale
        if self.beta > 0:
            newest, m_weight = _recency(history, 0.5, last=self.markov_last)
            trans, m_share = _weighted_rows(self.trans, newest, m_weight, targets)
            t_scale = max(float(trans.max()), 1e-9)
            at = np.searchsorted(items, newest)  # the newest items are among the history's
            share[at] += self.beta * m_share / t_scale
            means[at] += self.beta * m_weight * _ROW_MEANS(self.trans)[newest] / t_scale
            row = row + self.beta * trans / t_scale
        return items, _centred(share, means, row)


class ItemKNNScorer:
    """Item-kNN: the recency-weighted history times a sparse neighbour table (rows = sources).

    The lab's fitted ``ItemKNN`` writes the table (``itemknn.*`` CSR arrays); serving scores
    from it with the same rule.
    """

    name = "itemknn"

    def __init__(self, sim: sp.csr_matrix, *, decay: float) -> None:
        self.sim = sim
        self.n_items = int(sim.shape[0])
        self.decay = decay

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], n_items: int, *, decay: float
    ) -> ItemKNNScorer:
        """The scorer of ``ItemKNN.to_arrays`` output; ``ValueError`` if the arrays disagree."""
        try:
            sim = sp.csr_matrix(
                (arrays["itemknn.data"], arrays["itemknn.indices"], arrays["itemknn.indptr"]),
                shape=(n_items, n_items),
            )
            sim.check_format(full_check=True)
        except KeyError as exc:
            raise ValueError(f"missing array {exc}") from exc
        return cls(sim.astype(np.float32), decay=decay)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        w = recency_weights(histories, self.n_items, self.decay)
        return _dense(w @ self.sim)

    def attribute(self, history: np.ndarray, targets: np.ndarray) -> Attribution:
        """Each history item's share of ``targets``' scores (see :data:`Attribution`): the
        score is the recency-weighted sum of the items' neighbour rows."""
        items, weight = _recency(history, self.decay)
        row, share = _weighted_rows(self.sim, items, weight, targets)
        return items, _centred(share, weight * _ROW_MEANS(self.sim)[items], row)


class PopularityScorer:
    """Training popularity as a catalog score (the same row for every history)."""

    name = "pop"

    def __init__(self, counts: np.ndarray) -> None:
        self.counts = np.asarray(counts, dtype=np.float32)
        self.n_items = int(self.counts.shape[0])

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.tile(self.counts, (len(histories), 1))
