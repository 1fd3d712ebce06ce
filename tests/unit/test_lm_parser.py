"""The language-model parser (measured, not served): constrained decoding answers valid JSON of
catalog values whatever the model prefers, title candidates, and where :func:`combine` lets the
model help the rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inference.conversation import CatalogAttributes, Parsed, RuleParser
from lab.lm_parser import LMParser, combine, display_title
from schemas.conversation import Constraints
from tests.unit.test_conversation import _WORDS, _like


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
