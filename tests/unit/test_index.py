"""FAISS item index: exact neighbours, exclusions, approximate option, save/load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.exceptions import ArtifactError, InferenceError
from inference.index import IndexKind, ItemIndex


def _unit(rows: np.ndarray) -> np.ndarray:
    unit: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit.astype(np.float32)


@pytest.fixture(scope="module")
def catalog() -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(500, 32)))
    return [f"i{n}" for n in range(500)], vectors


def _brute_force(vectors: np.ndarray, query: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-(vectors @ query), kind="stable")[:k]]


def test_flat_search_returns_the_exact_neighbours_in_batches(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    ids, vectors = catalog
    index = ItemIndex.build(ids, vectors, kind="flat")
    queries = _unit(np.random.default_rng(1).normal(size=(7, 32)))
    found, scores = index.search(queries, 10)
    for q in range(7):
        expected = _brute_force(vectors, queries[q], 10)
        assert found[q] == [ids[i] for i in expected]
        np.testing.assert_allclose(scores[q], vectors[expected] @ queries[q], rtol=1e-5)


def test_exclusions_are_never_returned_and_rows_stay_full(
    catalog: tuple[list[str], np.ndarray],
) -> None:
    ids, vectors = catalog
    index = ItemIndex.build(ids, vectors, kind="flat")
    query = vectors[:2]
    plain, _ = index.search(query, 20)
    # Exclude the 30 best of the first query (more than k) and nothing of the second.
    top30, _ = index.search(query[:1], 30)
    found, _ = index.search(query, 20, exclude=[set(top30[0]), set()])
    assert len(found[0]) == 20
    assert not set(found[0]) & set(top30[0])
    order = _brute_force(vectors, query[0], 50)
    assert found[0] == [ids[i] for i in order[30:50]]
    assert found[1] == plain[1]


def test_small_catalog_returns_what_is_left() -> None:
    vectors = _unit(np.eye(4, dtype=np.float32) + 0.1)
    index = ItemIndex.build(["a", "b", "c", "d"], vectors)
    found, scores = index.search(vectors[0], 10, exclude=[{"b", "zz"}])
    assert found[0][0] == "a"
    assert sorted(found[0]) == ["a", "c", "d"]
    assert len(scores[0]) == 3


def test_hnsw_recall_is_high(catalog: tuple[list[str], np.ndarray]) -> None:
    ids, vectors = catalog
    index = ItemIndex.build(ids, vectors, kind="hnsw")
    queries = vectors[:50]
    found, _ = index.search(queries, 10, exclude=[{ids[q]} for q in range(50)])
    hits = 0
    for q in range(50):
        truth = {ids[i] for i in _brute_force(vectors, queries[q], 11)} - {ids[q]}
        hits += len(truth & set(found[q]))
        assert ids[q] not in found[q]
    assert hits / 500 > 0.9


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_save_and_load_keep_ids_and_answers(
    kind: IndexKind, catalog: tuple[list[str], np.ndarray], tmp_path: Path
) -> None:
    ids, vectors = catalog
    index = ItemIndex.build(ids, vectors, kind=kind)
    index.save(tmp_path)
    loaded = ItemIndex.load(tmp_path)
    assert loaded.item_ids == ids and loaded.kind == kind
    assert loaded.search(vectors[:3], 5)[0] == index.search(vectors[:3], 5)[0]
    np.testing.assert_allclose(loaded.vectors(["i3", "i0"]), vectors[[3, 0]], rtol=1e-6)


def test_bad_inputs_are_refused(catalog: tuple[list[str], np.ndarray], tmp_path: Path) -> None:
    ids, vectors = catalog
    with pytest.raises(InferenceError):
        ItemIndex.build(ids[:10], vectors)
    index = ItemIndex.build(ids, vectors)
    with pytest.raises(InferenceError):
        index.search(np.zeros((1, 8), np.float32), 3)
    with pytest.raises(InferenceError):
        index.vectors(["nope"])
    with pytest.raises(ArtifactError):
        ItemIndex.load(tmp_path)
