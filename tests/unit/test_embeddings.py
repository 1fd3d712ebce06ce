"""MiniLM item embeddings: reproduce sentence-transformers, item text, cache, profiles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.embeddings import (
    DIM,
    EmbeddingCache,
    TextEncoder,
    embed_items,
    embed_texts,
    item_text,
    profile_embedding,
)
from inference.exceptions import InferenceError
from inference.integrity import MINILM
from lab.datasets import Item

TEXTS = [
    "Toy Story (1995). Genres: Animation, Children, Comedy",
    "A gritty crime drama about a family of gangsters.",
    "short",
]


@pytest.fixture(scope="session")
def encoder() -> TextEncoder:
    return TextEncoder()


def test_reproduces_the_sentence_transformers_embedding(encoder: TextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(MINILM.folder()), device="cpu", local_files_only=True)
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    ours = encoder.encode(TEXTS, batch_size=2)  # batches mix lengths, so padding is exercised
    assert ours.shape == (3, DIM) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_similar_texts_are_closer(encoder: TextEncoder) -> None:
    vectors = encoder.encode(
        ["A space adventure with starships", "Science fiction war among the stars", "Cooking pasta"]
    )
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.1


def test_item_text_carries_title_year_genres_and_tags() -> None:
    text = item_text(Item("1", "Heat", ("Action", "Crime"), 1995, "heist,\n  Al Pacino"))
    assert text == "Heat (1995). Genres: Action, Crime. heist, Al Pacino"
    # MovieLens titles already end with the year: it is not repeated.
    assert item_text(Item("2", "Heat (1995)", (), 1995)) == "Heat (1995)"


def test_cache_returns_the_same_vectors_without_encoding(
    encoder: TextEncoder, tmp_path: Path
) -> None:
    cache = EmbeddingCache(tmp_path)
    items = [Item("1", "Heat", ("Action",), 1995), Item("2", "Up", ("Animation",), 2009)]
    first = embed_items(items, encoder=encoder, cache=cache)
    assert len(list(tmp_path.glob("*.npy"))) == 1

    class Refuses(TextEncoder):
        def __init__(self) -> None:
            self.model_digest = encoder.model_digest

        def encode(self, texts: object, batch_size: int = 64) -> np.ndarray:
            raise AssertionError("the cache should have answered")

    np.testing.assert_array_equal(embed_items(items, encoder=Refuses(), cache=cache), first)
    assert EmbeddingCache.key(["ab", "c"], "m") != EmbeddingCache.key(["a", "bc"], "m")
    assert EmbeddingCache.key(["a"], "m1") != EmbeddingCache.key(["a"], "m2")
    assert embed_texts(["Heat (1995). Genres: Action"], encoder=encoder).shape == (1, DIM)


def test_profile_is_the_normalised_weighted_mean() -> None:
    vectors = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(
        profile_embedding(vectors, [3.0, 1.0]), [3 / 10**0.5, 1 / 10**0.5], rtol=1e-6
    )
    np.testing.assert_allclose(profile_embedding(vectors), [0.7071068, 0.7071068], rtol=1e-6)
    with pytest.raises(InferenceError):
        profile_embedding(vectors, [0.0, 0.0])
    with pytest.raises(InferenceError):
        profile_embedding(np.zeros((0, 2), np.float32))
