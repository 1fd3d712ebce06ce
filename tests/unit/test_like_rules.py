"""The ways of serving "more like <title>" that the bench compares: each brings the list closer
to the film, and the served rule, written as a variant, lists what serving lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.conversation import LIKE_RULE, CatalogAttributes, refine
from lab.like_rules import SERVED, LikeVariant
from schemas.catalog import Item
from schemas.conversation import Constraints
from tests.unit.test_conversation import like_order


def test_a_heavier_weight_pulls_the_films_twin_higher() -> None:
    # The model's order, item 0 left out; then the twin (item 8) climbs with the weight.
    assert like_order(LikeVariant(), twin=8) == [str(n) for n in range(1, 11)]
    assert like_order(LikeVariant(weight=0.25), twin=8).index("8") < 4
    assert like_order(LikeVariant(weight=1.0), twin=8)[0] == "8"


def _like_case(n: int = 40) -> tuple[CatalogAttributes, list[tuple[str, float]], Any]:
    """Items 0..n-1 ranked in that order by the model; item ``n`` is the film named, and the
    higher an item's number the closer it is to the film (items 30 up share its genre)."""
    items = [Item(str(i), f"t{i}", ("Drama",) if i < 30 else ("Western",), 1990) for i in range(n)]
    attributes = CatalogAttributes([*items, Item(str(n), "film", ("Western",), 1990)])
    angle = np.linspace(1.5, 0.0, n + 1)
    angle[n] = 0.0
    vectors = np.stack([np.cos(angle), np.sin(angle)], axis=1).astype(np.float32)
    ranked = [(str(i), 1.0 - i / n) for i in range(n + 1)]
    return attributes, ranked, lambda ids: vectors[[int(i) for i in ids]]


@pytest.mark.parametrize(
    "rule",
    [
        LikeVariant(weight=2.0),
        LikeVariant(weight=2.0, model_order=True),
        LikeVariant(weight=2.0, keep=3, model_order=True),
        LikeVariant(near=0.25),
        LikeVariant(shared_genre=True),
        LikeVariant(near=0.1, shared_genre=True, weight=2.0),
    ],
)
def test_each_like_rule_lists_k_items_closer_to_the_film_than_the_models_own(
    rule: LikeVariant,
) -> None:
    attributes, ranked, vectors = _like_case()
    film = Constraints(like=("40",))
    out = [i for i, _ in refine(ranked, film, attributes, 10, vectors, like_rule=rule)]
    assert len(out) == len(set(out)) == 10 and "40" not in out
    plain = [str(i) for i in range(10)]
    anchor = vectors(["40"])[0]
    assert (vectors(out) @ anchor).mean() > (vectors(plain) @ anchor).mean()
    if rule.model_order:  # the items chosen, in the model's order
        assert out == sorted(out, key=int)
    assert out[: rule.keep] == plain[: rule.keep]  # the model's first ``keep`` stay first
    if rule.shared_genre:  # ten of the items share the film's genre: all of them come out
        assert sorted(out, key=int) == [str(i) for i in range(30, 40)]
    if rule.near < 1.0:  # only the items nearest the film, best first by the model
        assert set(out) <= {str(i) for i in range(40 - max(10, int(rule.near * 40)), 40)}


def test_a_narrow_like_subset_is_filled_up_in_the_models_order() -> None:
    attributes, ranked, vectors = _like_case()
    film = Constraints(like=("40",))
    out = refine(ranked, film, attributes, 15, vectors, like_rule=LikeVariant(shared_genre=True))
    assert [i for i, _ in out] == [*(str(i) for i in range(30, 40)), *map(str, range(5))]
    with pytest.raises(ValueError, match="near"):
        LikeVariant(near=0.0)


@settings(max_examples=200, deadline=None)
@given(
    scores=st.lists(st.integers(0, 5), min_size=1, max_size=40),
    cosines=st.lists(st.integers(-3, 3), min_size=40, max_size=40),
    k=st.integers(1, 15),
)
def test_the_served_rule_as_a_variant_lists_what_serving_lists(
    scores: Sequence[int], cosines: Sequence[int], k: int
) -> None:
    # Few distinct values: ties in the model's score and in the blend are common.
    attributes, _, _ = _like_case()
    kept = [(str(i), float(s)) for i, s in enumerate(sorted(scores, reverse=True))]
    similarity = np.asarray(cosines[: len(kept)], dtype=np.float64) / 3
    film = Constraints(like=("40",))
    assert SERVED.name == "weight 0.5, keep 7, model order"
    assert SERVED(kept, similarity, k, film, attributes) == LIKE_RULE(
        kept, similarity, k, film, attributes
    )
