"""CF that scales with the catalog: sparse item-kNN, EASE bounded to the frequent items,
vectorised target ranks; each checked against the plain dense computation it replaces."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from lab.baselines import EASE, ItemKNN, interaction_matrix, top_k_per_row, transitions
from lab.datasets import Dataset, Interaction, Item
from lab.protocol import Split, leave_one_out, target_ranks

N_ITEMS = 30


@pytest.fixture(scope="module")
def split() -> Split:
    rng = np.random.default_rng(3)
    popularity = (np.arange(N_ITEMS) + 2.0) ** -1.0
    popularity /= popularity.sum()
    rows = []
    for u in range(80):
        for step, item in enumerate(
            rng.choice(N_ITEMS, size=int(rng.integers(3, 15)), p=popularity)
        ):
            rows.append(Interaction(f"u{u}", f"i{item}", float(u * 100 + step)))
    items = {f"i{i}": Item(f"i{i}", f"i{i}") for i in range(N_ITEMS)}
    return leave_one_out(Dataset("pl", rows, items))


def _dense_ease(split: Split, lam: float) -> np.ndarray:
    x = interaction_matrix(split).toarray().astype(np.float64)
    p = np.linalg.inv(x.T @ x + lam * np.eye(split.n_items))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def test_ease_equals_the_dense_closed_form_when_unbounded(split: Split) -> None:
    ease = EASE(lam=5.0, decay=1.0, beta=0.0, max_items=10_000).fit(split)
    np.testing.assert_allclose(ease.weights, _dense_ease(split, 5.0), atol=2e-5)
    ease.lam = 50.0  # a new lam re-solves from the same Gram matrix
    np.testing.assert_allclose(ease.weights, _dense_ease(split, 50.0), atol=2e-5)


def test_bounded_ease_solves_the_most_frequent_items_only(split: Split) -> None:
    bounded = EASE(lam=5.0, decay=1.0, beta=0.0, max_items=10).fit(split)
    counts = np.asarray(interaction_matrix(split).sum(axis=0)).ravel()
    assert len(bounded.kept) == 10
    assert counts[bounded.kept].min() >= np.delete(counts, bounded.kept).max()
    # The solved block is EASE on the frequent items' columns alone.
    x = interaction_matrix(split)[:, bounded.kept].toarray().astype(np.float64)
    p = np.linalg.inv(x.T @ x + 5.0 * np.eye(10))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(bounded.block, b, atol=2e-5)
    scores = bounded.score(split.histories("test"))
    rare = np.setdiff1d(np.arange(split.n_items), bounded.kept)
    assert np.all(scores[:, rare] == 0.0)
    assert np.any(scores[:, bounded.kept] != 0.0)
    # Its artifact arrays, unpruned, reproduce the fitted model's weights over the catalog.
    arrays = bounded.to_arrays(top_k=N_ITEMS)
    stored = sp.csc_matrix(
        (arrays["ease.data"], arrays["ease.indices"], arrays["ease.indptr"]),
        shape=(N_ITEMS, N_ITEMS),
    ).toarray()
    np.testing.assert_array_equal(stored, bounded.weights)


def test_transitions_are_row_normalised_next_item_counts(split: Split) -> None:
    dense = np.zeros((N_ITEMS, N_ITEMS))
    for seq in split.train:
        for a, b in itertools.pairwise(seq):
            dense[a, b] += 1
    sums = dense.sum(axis=1, keepdims=True)
    dense = np.divide(dense, sums, out=np.zeros_like(dense), where=sums > 0)
    np.testing.assert_allclose(transitions(split).toarray(), dense, atol=1e-6)


def test_sparse_itemknn_keeps_the_k_most_similar_neighbours(split: Split) -> None:
    knn = ItemKNN(k_neighbours=4, decay=0.8).fit(split)
    x = interaction_matrix(split).toarray().astype(np.float64)
    co = x.T @ x
    norms = np.sqrt(np.diag(co))
    norms[norms == 0] = 1.0
    cos = co / norms[:, None] / norms[None, :]
    np.fill_diagonal(cos, 0.0)
    sim = knn.sim.toarray()
    for row in range(N_ITEMS):
        kept = np.flatnonzero(sim[row])
        assert len(kept) <= 4
        np.testing.assert_allclose(sim[row, kept], cos[row, kept], atol=1e-6)
        if len(kept):
            others = np.setdiff1d(np.arange(N_ITEMS), kept)
            assert cos[row, others].max() <= sim[row, kept].min() + 1e-6
    # Tuning re-prunes the stored similarities: a larger k keeps a superset.
    knn.k_neighbours = 8
    knn.fit(split)
    assert set(zip(*sim.nonzero(), strict=True)) <= set(zip(*knn.sim.nonzero(), strict=True))


def test_top_k_per_row_breaks_ties_by_column() -> None:
    mat = sp.csr_matrix(np.array([[0.5, 0.5, 0.5, 0.1], [0.0, 0.0, 0.2, 0.0]]))
    out = top_k_per_row(mat, 2).toarray()
    np.testing.assert_array_equal(out, [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.2, 0.0]])


def test_vectorised_ranks_match_the_per_user_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=(40, 25)).astype(np.float32)  # many ties
    hists = [rng.choice(25, size=int(rng.integers(1, 6)), replace=False) for _ in range(40)]
    targets = rng.integers(0, 25, size=40)
    expected = []
    for s, h, t in zip(scores, hists, targets, strict=True):
        row = s.astype(np.float64).copy()
        if t in h:
            expected.append(25)
            continue
        row[h] = -np.inf
        expected.append(int((row > row[t]).sum() + (row == row[t]).sum() - 1))
    np.testing.assert_array_equal(target_ranks(scores, hists, targets), expected)
