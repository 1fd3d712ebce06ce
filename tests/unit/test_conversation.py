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
    LMParser,
    Parsed,
    RuleParser,
    combine,
    describe,
    display_title,
    load_tokenizer,
    merge,
    refine,
    trim_turns,
)
from inference.reasons import occlusion_reasons
from inference.scoring import EaseScorer
from lab.datasets import load_dataset
from recstream.settings import CommonSettings
from schemas.catalog import Item
from schemas.conversation import Constraints, Turn


@pytest.fixture(scope="module")
def attributes() -> CatalogAttributes:
    return CatalogAttributes(load_dataset("ml-100k", CommonSettings().data_dir).items.values())


@pytest.fixture(scope="module")
def parser(attributes: CatalogAttributes) -> RuleParser:
    return RuleParser(attributes)


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


def test_a_like_title_pulls_similar_items_up_and_is_never_listed_itself() -> None:
    items = [Item(str(n), f"t{n}", ("Comedy",), 1990) for n in range(20)]
    attributes = CatalogAttributes(items)
    vectors = np.eye(20, dtype=np.float32)
    vectors[8] = vectors[0]  # item 8 is just like item 0
    ranked = [(str(n), 1.0 - n / 20) for n in range(20)]

    def order(rule: LikeRule) -> list[str]:
        out = refine(
            ranked,
            Constraints(like=("0",)),
            attributes,
            10,
            lambda ids: vectors[[int(i) for i in ids]],
            like_rule=rule,
        )
        return [i for i, _ in out]

    assert order(LikeRule()) == [str(n) for n in range(1, 11)]  # the model's, item 0 left out
    assert order(LikeRule(weight=0.25)).index("8") < 4
    assert order(LikeRule(weight=1.0))[0] == "8"
    vectors[8], vectors[15] = vectors[8 - 1], vectors[0]  # now item 15 is the twin
    served = order(LIKE_RULE)
    assert served[: LIKE_RULE.keep] == [str(n) for n in range(1, LIKE_RULE.keep + 1)]
    assert "15" in served and served == sorted(served, key=int)  # the list in model order


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
        LikeRule(weight=2.0),
        LikeRule(weight=2.0, model_order=True),
        LikeRule(weight=2.0, keep=3, model_order=True),
        LikeRule(near=0.25),
        LikeRule(shared_genre=True),
        LikeRule(near=0.1, shared_genre=True, weight=2.0),
    ],
)
def test_each_like_rule_lists_k_items_closer_to_the_film_than_the_models_own(
    rule: LikeRule,
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
    out = refine(ranked, film, attributes, 15, vectors, like_rule=LikeRule(shared_genre=True))
    assert [i for i, _ in out] == [*(str(i) for i in range(30, 40)), *map(str, range(5))]
    with pytest.raises(ValueError, match="near"):
        LikeRule(near=0.0)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer()


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


def test_display_titles_read_as_people_write_them() -> None:
    assert display_title("Godfather, The (1972)") == "The Godfather"
    assert display_title("Toy Story (1995)") == "Toy Story"
    assert display_title("Shall We Dance? (1996)") == "Shall We Dance?"


class _Model:
    """A causal LM's call as :class:`LMParser` makes it, with logits from a seeded generator:
    whatever a model prefers, the answer must stay valid. Records the tokens it is fed."""

    def __init__(self, vocabulary: int, seed: int, favour: Sequence[int] = ()) -> None:
        import torch

        self.vocabulary, self.favour = vocabulary, list(favour)
        self.generator = torch.Generator().manual_seed(seed)
        self.fed: dict[int, list[int]] = {}  # by cache

    def __call__(self, input_ids: Any, past_key_values: Any, use_cache: bool) -> Any:
        import torch

        ids = input_ids[0].tolist()
        self.fed.setdefault(id(past_key_values), []).extend(ids)
        logits = torch.randn(1, len(ids), self.vocabulary, generator=self.generator)
        logits[0, -1, self.favour] += 100.0  # e.g. tokens that would break the JSON
        return type("Out", (), {"logits": logits})()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**31 - 1),
    message=st.lists(_WORDS, max_size=12).map(" ".join),
    calibrate=st.booleans(),
)
def test_constrained_decoding_answers_valid_json_of_catalog_values_whatever_the_model_prefers(
    parser: RuleParser, tokenizer: Any, seed: int, message: str, calibrate: bool
) -> None:
    import json

    attributes = parser.attributes

    breaking = [tokenizer.encode(t, add_special_tokens=False)[0] for t in ("}", " ignore", "\n")]
    model = _Model(len(tokenizer), seed, breaking)
    lm = LMParser(model, tokenizer, parser, calibrate=calibrate)
    message = f"more like Toy Story {message}"
    answer, candidates = lm.generate(message)
    data = json.loads(answer)
    assert list(data) == ["genres", "exclude", "from", "to", "like", "reset"]
    assert set(data["genres"]) | set(data["exclude"]) <= set(attributes.genres)
    assert not set(data["genres"]) & set(data["exclude"])
    assert len(data["genres"]) == len(set(data["genres"])) <= 3
    newest = attributes.newest_year
    for year in (data["from"], data["to"]):
        assert year is None or 1900 <= year <= (newest or 0)
    if data["from"] is not None and data["to"] is not None:
        assert data["from"] <= data["to"]
    assert data["like"] is None or data["like"] in candidates
    assert "Toy Story" in candidates and candidates["Toy Story"] == _like(attributes, "Toy Story")
    assert isinstance(data["reset"], bool)
    # The pieces were fed as the whole answer tokenizes: the model reads what it would write.
    prompt = tokenizer.apply_chat_template(
        [*lm._turns, {"role": "user", "content": message}],
        tokenize=False,
        add_generation_prompt=True,
    )
    whole = lm._ids(prompt + answer)
    fed = model.fed[id(lm._prefix_cache)]
    assert fed[len(lm._prefix_ids) :] == whole[len(lm._prefix_ids) : len(fed)]
    assert len(model.fed) == 1 + calibrate  # the content-free message runs apart
    parsed = lm.read_answer(answer, candidates)
    assert set(parsed.constraints.like) <= set(candidates.values())


def test_title_candidates_are_the_titles_typed_then_none_unknown(
    parser: RuleParser, attributes: CatalogAttributes, tokenizer: Any
) -> None:
    lm = LMParser(None, tokenizer, parser)
    found = lm.title_candidates("something like the godfather or star wars, not alien")
    assert list(found)[:2] == ["The Godfather", "Star Wars"]  # longer runs first
    assert found["Alien"] == _like(attributes, "Alien")
    assert all(item in attributes for item in found.values())
    assert lm.title_candidates("zzz qqq") == {}


def test_the_language_model_helps_only_where_combine_lets_it() -> None:
    calls: list[str] = []
    lm_reading = Parsed(True, Constraints(genres=("Comedy",), year_min=1990, like=("1",)))

    def lm() -> Parsed:
        calls.append("lm")
        return lm_reading

    rules = Parsed(False, Constraints(exclude_genres=("Comedy",), year_max=1980))
    assert combine(rules, lm, "empty") == rules and calls == []  # the rules understood
    assert combine(Parsed(False, Constraints()), lm, "empty") == lm_reading
    # "fill": each field the rules left empty, never against what they read.
    assert combine(rules, lm, "fill") == Parsed(
        True, Constraints(exclude_genres=("Comedy",), year_max=1980, like=("1",))
    )
    with pytest.raises(ValueError, match="unknown"):
        combine(rules, lm, "always")
