"""Post-processing: seen and unknown items, cosine floor, MMR diversification."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from inference.exceptions import InferenceError
from inference.postprocess import CatalogPost, PostConfig, mmr, postprocess

VECTORS = {
    "a": np.array([1.0, 0.0, 0.0], np.float32),
    "a2": np.array([0.99, 0.141, 0.0], np.float32),  # nearly a duplicate of "a"
    "b": np.array([0.0, 1.0, 0.0], np.float32),
    "c": np.array([0.0, 0.0, 1.0], np.float32),
}


def lookup(ids: Sequence[str]) -> np.ndarray:
    return np.stack([VECTORS[i] for i in ids])


def test_drops_seen_unknown_duplicate_and_nonfinite_candidates() -> None:
    out = postprocess(
        ["x", "a", "ghost", "b", "a", "c", "nan"],
        [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, float("nan")],
        k=10,
        catalog={"x", "a", "b", "c", "nan"},
        seen={"x"},
    )
    assert out.item_ids == ["a", "b", "c"]
    assert out.scores == [8.0, 6.0, 4.0]
    assert (out.dropped_seen, out.rejected_unknown, out.dropped_invalid) == (1, 1, 2)


def test_orders_by_score_and_cuts_at_k() -> None:
    out = postprocess(["a", "b", "c"], [0.1, 0.9, 0.5], k=2, catalog=VECTORS)
    assert out.item_ids == ["b", "c"]


def test_cosine_floor_keeps_items_close_to_the_profile() -> None:
    profile = np.array([1.0, 0.2, 0.0], np.float32)
    out = postprocess(
        ["a", "b", "c"],
        [1.0, 2.0, 3.0],
        k=3,
        catalog=VECTORS,
        profile=profile,
        item_vectors=lookup,
        cosine_floor=0.5,
    )
    assert out.item_ids == ["a"]
    assert out.dropped_floor == 2


def test_mmr_pushes_a_near_duplicate_down() -> None:
    ids, scores = ["a", "a2", "b"], [1.0, 0.95, 0.6]
    plain = postprocess(ids, scores, k=3, catalog=VECTORS)
    diverse = postprocess(ids, scores, k=3, catalog=VECTORS, item_vectors=lookup, mmr_lambda=0.5)
    assert plain.item_ids == ["a", "a2", "b"]
    assert diverse.item_ids == ["a", "b", "a2"]
    relevance_only = postprocess(
        ids, scores, k=3, catalog=VECTORS, item_vectors=lookup, mmr_lambda=1.0
    )
    assert relevance_only.item_ids == plain.item_ids


def test_mmr_returns_distinct_rows_up_to_k() -> None:
    rng = np.random.default_rng(3)
    picked = mmr(rng.random(20), rng.normal(size=(20, 8)).astype(np.float32), 10, 0.3)
    assert len(picked) == 10 == len(set(picked))
    with pytest.raises(InferenceError):
        mmr([1.0], np.ones((1, 2), np.float32), 1, 1.5)


def test_options_without_their_inputs_are_refused() -> None:
    with pytest.raises(InferenceError):
        postprocess(["a"], [1.0], k=1, catalog=VECTORS, mmr_lambda=0.5)
    with pytest.raises(InferenceError):
        postprocess(["a"], [1.0], k=1, catalog=VECTORS, item_vectors=lookup, cosine_floor=0.1)
    with pytest.raises(InferenceError):
        postprocess(["a", "b"], [1.0], k=1, catalog=VECTORS)


def test_catalog_post_applies_the_floor_and_mmr_to_the_model_candidates() -> None:
    ids = ["a", "a2", "b", "c"]
    vectors = lookup(ids)
    history = np.array([0], dtype=np.int64)  # the user saw "a": the profile points along it
    scores = np.array([9.0, 3.0, 5.0, 1.0], np.float32)  # "b" is the model's best unseen item
    plain = CatalogPost(ids, vectors, PostConfig(mmr_lambda=1.0))
    assert plain.top(scores, history, 3)[0] == [2, 1, 3]  # relevance order, "a" excluded
    floored = CatalogPost(ids, vectors, PostConfig(cosine_floor=0.5))
    top, kept_scores = floored.top(scores, history, 3)
    assert top == [1]  # only "a2" is close to the profile
    assert kept_scores == [3.0]  # the model's own score
    # Without a history there is no profile, so the floor cannot apply.
    assert floored.top(scores, np.array([], dtype=np.int64), 2)[0] == [0, 2]


def test_catalog_post_refuses_mismatched_vectors() -> None:
    with pytest.raises(InferenceError):
        CatalogPost(["a", "b"], lookup(["a"]), PostConfig(cosine_floor=0.1))
