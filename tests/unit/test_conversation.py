"""Conversation: the rule parser over the real ML-100K catalog, follow-ups and resets, applying
constraints to a ranking, the session's 1024-token trim with SmolLM2's tokenizer, and reasons."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.conversation import (
    LIKE_RULE,
    TOKEN_BUDGET,
    CatalogAttributes,
    LikeRule,
    Parsed,
    RuleParser,
    describe,
    merge,
    refine,
    trim_turns,
)
from inference.reasons import occlusion_reasons
from inference.scoring import EaseScorer
from schemas.catalog import Item
from schemas.conversation import Constraints, Turn


def _like(attributes: CatalogAttributes, title: str) -> str:
    item = attributes.exact_title(title)
    assert item is not None
    return item


@pytest.mark.parametrize(
    ("message", "reset", "expected"),
    [
        ("something from the 90s", False, {"year_min": 1990, "year_max": 1999}),
        ("no horror please", False, {"exclude_genres": ("Horror",)}),
        ("more like Toy Story but for adults", False, {"exclude_genres": ("Children",)}),
        ("I'm in the mood for an old black-and-white classic", False, {"year_max": 1959}),
        ("funnier", False, {"genres": ("Comedy",)}),
        ("forget that, show me documentaries", True, {"genres": ("Documentary",)}),
        (
            "a rom-com from 1980 to 1989",
            False,
            {"genres": ("Romance", "Comedy"), "year_min": 1980, "year_max": 1989},
        ),
        (
            "anything but westerns, and nothing scary",
            False,
            {"exclude_genres": ("Western", "Horror")},
        ),
        ("more like Star Wars", False, {}),  # the title's "war" is no genre
    ],
)
def test_the_issue_examples_parse_to_catalog_constraints(
    parser: RuleParser,
    attributes: CatalogAttributes,
    message: str,
    reset: bool,
    expected: dict[str, Any],
) -> None:
    parsed = parser.parse(message)
    titles = [t for t in ("Toy Story", "Star Wars") if t in message]
    like = tuple(_like(attributes, t) for t in titles)
    assert parsed == Parsed(reset, Constraints(**expected, like=like))


@pytest.mark.parametrize(
    ("message", "reset", "expected"),
    [
        # A negated bound is the other side of it, never an empty range.
        ("nothing newer than 1990", False, {"year_max": 1990}),
        ("I don't want anything after 1995", False, {"year_max": 1995}),
        (
            "a crime movie, but nothing from before 1990",
            False,
            {"genres": ("Crime",), "year_min": 1990},
        ),
        ("no horror before 1990", False, {"exclude_genres": ("Horror",), "year_max": 1989}),
        ("not older than 1990", False, {"year_min": 1990}),
        # Two decades, and the years between.
        (
            "westerns from the sixties or seventies",
            False,
            {"genres": ("Western",), "year_min": 1960, "year_max": 1979},
        ),
        ("late 60s to early 70s", False, {"year_min": 1966, "year_max": 1973}),
        (
            "anything animated that isn't meant for children?",
            False,
            {"genres": ("Animation",), "exclude_genres": ("Children",)},
        ),
        ("a spy film", False, {"genres": ("Thriller",)}),
        # Starting over in other words; they ask for nothing themselves ("fresh" is no "new").
        ("start fresh", True, {}),
        ("scrap all that", True, {}),
        ("try again: documentaries", True, {"genres": ("Documentary",)}),
    ],
)
def test_negated_bounds_two_decades_and_other_ways_to_start_over(
    parser: RuleParser, message: str, reset: bool, expected: dict[str, Any]
) -> None:
    assert parser.parse(message) == Parsed(reset, Constraints(**expected))


def test_follow_ups_refine_the_previous_turn_and_a_reset_starts_over(parser: RuleParser) -> None:
    constraints = Constraints()
    for message in ("no horror please", "something from the 90s", "funnier"):
        constraints = merge(constraints, parser.parse(message))
    assert constraints == Constraints(
        genres=("Comedy",), exclude_genres=("Horror",), year_min=1990, year_max=1999
    )
    # Asking for what was excluded lifts the exclusion; a new year bound replaces the old one.
    constraints = merge(constraints, parser.parse("actually scary is fine, from the 80s"))
    assert constraints.exclude_genres == ()
    assert ("Horror" in constraints.genres, constraints.year_min) == (True, 1980)
    constraints = merge(constraints, parser.parse("start over: documentaries"))
    assert constraints == Constraints(genres=("Documentary",))


_WORDS = st.sampled_from(
    [
        *("no", "not", "horror", "funny", "90s", "1970", "before", "after", "more", "like"),
        *("toy", "story", "star", "wars", "the", "for", "adults", "kids", "old", "forget"),
        *("black-and-white", "that", "sci-fi", "between", "and", "1999", "classic", "recent"),
        *("ignore", "previous", "instructions", "genres:", "Horror,", "{}", "anything but"),
        *('"', "'", "\\", "\u00e9", "\u2019", "\x00", "\ufeff"),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.lists(_WORDS, max_size=40).map(" ".join)))
def test_any_message_yields_only_what_the_catalog_has(
    parser: RuleParser, attributes: CatalogAttributes, message: str
) -> None:
    parsed = parser.parse(message)
    c = parsed.constraints
    assert set(c.genres) | set(c.exclude_genres) <= set(attributes.genres)
    assert not set(c.genres) & set(c.exclude_genres)
    assert all(item in attributes for item in c.like + c.exclude_items)


@st.composite
def _constraints(draw: st.DrawFn, genres: Sequence[str], items: Sequence[str]) -> Constraints:
    lo = draw(st.none() | st.integers(1920, 2000))
    return Constraints(
        genres=tuple(draw(st.lists(st.sampled_from(genres), max_size=2, unique=True))),
        exclude_genres=tuple(draw(st.lists(st.sampled_from(genres), max_size=2, unique=True))),
        year_min=lo,
        year_max=draw(st.none() | st.integers(lo or 1920, 2000)),
        like=tuple(draw(st.lists(st.sampled_from(items), max_size=2, unique=True))),
        exclude_items=tuple(draw(st.lists(st.sampled_from(items), max_size=3, unique=True))),
    )


def test_refine_keeps_only_catalog_items_that_meet_every_constraint_in_model_order(
    attributes: CatalogAttributes,
) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(attributes), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)

    def lookup(ids: Sequence[str]) -> np.ndarray:
        return vectors[[attributes.position[i] for i in ids]]

    @settings(max_examples=150, deadline=None)
    @given(_constraints(attributes.genres, attributes.item_ids[:200]), st.integers(1, 30))
    def check(constraints: Constraints, k: int) -> None:
        scores = rng.normal(size=len(attributes))
        ranked = sorted(zip(attributes.item_ids, scores.tolist(), strict=True), key=lambda p: -p[1])
        ranked = [*ranked, ("not-in-the-catalog", 99.0)]
        out = refine(ranked, constraints, attributes, k, lookup)
        ids = [i for i, _ in out]
        assert len(ids) == len(set(ids)) <= k
        assert all(attributes.satisfies(i, constraints) for i in ids)
        assert not set(ids) & set(constraints.like)
        eligible = [
            i
            for i, _ in ranked
            if i in attributes
            and attributes.satisfies(i, constraints)
            and i not in constraints.like
        ]
        assert len(ids) == min(k, len(eligible))
        if not constraints.like:  # without "like", exactly the model's order
            assert ids == eligible[:k]
        for i in ids:
            named = describe(constraints, attributes, i)
            assert len(named) == len(constraints.genres) + len(constraints.exclude_genres) + (
                constraints.year_min is not None or constraints.year_max is not None
            ) + len([x for x in constraints.exclude_items if x != i])

    check()


def like_order(rule: LikeRule, twin: int) -> list[str]:
    """The 10 items ``rule`` lists for "more like 0" among 20 comedies that the model ranks in
    id order, where item ``twin`` is just like item 0 (the same MiniLM vector) and the others
    are unrelated."""
    attributes = CatalogAttributes([Item(str(n), f"t{n}", ("Comedy",), 1990) for n in range(20)])
    vectors = np.eye(20, dtype=np.float32)
    vectors[twin] = vectors[0]
    ranked = [(str(n), 1.0 - n / 20) for n in range(20)]
    out = refine(
        ranked,
        Constraints(like=("0",)),
        attributes,
        10,
        lambda ids: vectors[[int(i) for i in ids]],
        like_rule=rule,
    )
    return [i for i, _ in out]


def test_a_like_title_pulls_similar_items_up_and_is_never_listed_itself() -> None:
    served = like_order(LIKE_RULE, twin=15)
    assert "0" not in served
    assert served[: LIKE_RULE.keep] == [str(n) for n in range(1, LIKE_RULE.keep + 1)]
    assert "15" in served and served == sorted(served, key=int)  # the list in model order


def test_the_session_keeps_the_newest_1024_tokens(tokenizer: Any) -> None:
    def tokens(turns: Sequence[Turn]) -> int:
        return sum(len(tokenizer.encode(t.text, add_special_tokens=False)) for t in turns)

    turns = [Turn(text=f"turn {n}: something from the {n}0s, no horror " * 12) for n in range(20)]
    assert tokens(turns) > TOKEN_BUDGET
    kept = trim_turns(turns, tokenizer)
    assert tokens(kept) <= TOKEN_BUDGET
    assert kept[-1] == turns[-1]  # the newest turn is whole
    # Everything but the oldest kept turn is whole; that one keeps its own newest tokens.
    assert kept[1:] == turns[len(turns) - len(kept) + 1 :]
    assert turns[len(turns) - len(kept)].text.endswith(kept[0].text[-40:])
    assert tokens(kept) > TOKEN_BUDGET - 20  # the budget is used, not left half empty
    # One turn longer than the budget alone keeps its last tokens.
    long = [Turn(text="x y " * 3000)]
    assert 0 < tokens(trim_turns(long, tokenizer)) <= TOKEN_BUDGET
    assert trim_turns(turns[:2], tokenizer) == turns[:2]


class _Ease:
    """EASE's scorer (the served code) over a small weight matrix, as attribution sees a model."""

    def __init__(self, weights: np.ndarray) -> None:
        n = weights.shape[0]
        self.ease = EaseScorer(
            weights, np.zeros((n, n)), lam=1.0, decay=1.0, beta=0.0, markov_last=1
        )
        self.item_ids = [f"i{n}" for n in range(n)]
        self.index = {item: n for n, item in enumerate(self.item_ids)}

    def to_indices(self, history: list[str]) -> np.ndarray:
        return np.asarray([self.index[i] for i in history if i in self.index], dtype=np.int64)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return self.ease.score(histories)


def test_reasons_are_the_history_items_whose_removal_costs_the_most() -> None:
    weights = np.zeros((6, 6), dtype=np.float32)
    weights[1, 4], weights[2, 4], weights[3, 4] = 0.9, 0.5, 0.2  # i1 > i2 > i3 behind i4
    weights[0, 5], weights[3, 5] = 5.0, -0.3  # i0 alone behind i5; i3 lowers it
    scorer = _Ease(weights)
    reasons = occlusion_reasons(scorer, ["i0", "i1", "i2", "i3"], ["i4", "i5", "nope"])
    assert reasons == {"i4": ["i1", "i2", "i3"], "i5": ["i0"], "nope": []}
    assert occlusion_reasons(scorer, ["i2"], ["i4"]) == {"i4": ["i2"]}
