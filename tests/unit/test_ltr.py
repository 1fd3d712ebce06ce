"""The learning-to-rank fusion: candidates never seen, features blind to the label, one user's
features independent of the others', the choice rule never below the best single model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.baselines import EASE, ItemKNN, PopularityRanker
from lab.ltr import (
    CHOICES,
    CandidateTable,
    LtrFusion,
    LtrParams,
    candidate_items,
    candidate_table,
    choose,
    cross_validate,
    fit_ltr,
    score_parts,
    standardised,
    table_ndcg,
    train_ranker,
)
from lab.protocol import Split
from tests.unit.test_hybrid import _Noise, _Oracle
from tests.unit.test_hybrid import _split as _cycle_split
from tests.unit.test_hybrid_artifact import _split as _walk_split

TINY = LtrParams(min_data_in_leaf=1, num_leaves=4, max_rounds=30, early_stopping=5, base_scale=0.0)


@st.composite
def _scored_histories(draw: st.DrawFn) -> tuple[dict[str, np.ndarray], list[np.ndarray], int]:
    n_items = draw(st.integers(2, 30))
    users = draw(st.integers(1, 6))
    histories = [
        np.array(
            draw(st.lists(st.integers(0, n_items - 1), min_size=1, max_size=n_items - 1)),
            dtype=np.int64,
        )
        for _ in range(users)
    ]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    scores = {
        name: rng.normal(size=(users, n_items)).astype(np.float32) for name in ("ease", "pop")
    }
    return scores, histories, draw(st.integers(1, 8))


@settings(max_examples=60, deadline=None)
@given(_scored_histories())
def test_candidates_are_unseen_and_hold_each_parts_top_unseen(
    case: tuple[dict[str, np.ndarray], list[np.ndarray], int],
) -> None:
    scores, histories, top_k = case
    cands = candidate_items(scores, histories, top_k)
    for u, (items, history) in enumerate(zip(cands, histories, strict=True)):
        assert not np.isin(items, history).any()
        unseen = np.setdiff1d(np.arange(scores["ease"].shape[1]), history)
        for part in scores.values():
            best = unseen[np.argsort(-part[u, unseen], kind="stable")][: min(top_k, len(unseen))]
            assert np.isin(best, items).all()
        assert len(items) <= min(len(scores) * top_k, len(unseen))


@pytest.fixture(scope="module")
def walk() -> tuple[Split, dict[str, object]]:
    split = _walk_split()
    parts: dict[str, object] = {
        "ease": EASE(lam=10.0, decay=0.9, beta=0.5, markov_last=2).fit(split),
        "itemknn": ItemKNN(k_neighbours=5, decay=0.8).fit(split),
        "pop": PopularityRanker().fit(split),
    }
    return split, parts


Scored = tuple[list[np.ndarray], np.ndarray, dict[str, np.ndarray], np.ndarray | None]


@pytest.fixture(scope="module")
def valid(walk: tuple[Split, dict[str, object]]) -> Scored:
    """The walk's validation histories, targets and parts' scores (with EASE's of the last item)."""
    split, parts = walk
    hist, targets = split.histories("valid"), split.targets("valid")
    scores, pair = score_parts(parts, hist, "ease")  # type: ignore[arg-type]
    return hist, targets, scores, pair


def test_features_do_not_read_the_targets(
    walk: tuple[Split, dict[str, object]], valid: Scored
) -> None:
    split, _ = walk
    hist, targets, scores, pair = valid
    labelled = candidate_table(scores, pair, hist, targets, top_k=5, pair="ease")
    other = candidate_table(scores, pair, hist, (targets + 1) % split.n_items, top_k=5, pair="ease")
    blind = candidate_table(scores, pair, hist, top_k=5, pair="ease")
    for table in (other, blind):
        np.testing.assert_array_equal(table.items, labelled.items)
        np.testing.assert_array_equal(table.features, labelled.features)
    assert not blind.labels.any()
    hits = labelled.labels > 0
    np.testing.assert_array_equal(labelled.items[hits], targets[labelled.users[hits]])
    assert not np.array_equal(labelled.labels, other.labels)


def test_a_users_features_do_not_depend_on_the_other_users(
    walk: tuple[Split, dict[str, object]], valid: Scored
) -> None:
    _, parts = walk
    hist, _, scores, pair = valid
    together = candidate_table(scores, pair, hist, top_k=5, pair="ease")
    for u in (0, len(hist) // 2, len(hist) - 1):
        alone_scores, alone_pair = score_parts(parts, [hist[u]], "ease")  # type: ignore[arg-type]
        alone = candidate_table(alone_scores, alone_pair, [hist[u]], top_k=5, pair="ease")
        mine = together.users == u
        np.testing.assert_array_equal(alone.items, together.items[mine])
        np.testing.assert_allclose(alone.features, together.features[mine], rtol=1e-5)


def column(table: CandidateTable, name: str) -> np.ndarray:
    out: np.ndarray = table.features[:, table.names.index(name)]
    return out


def test_fusion_column_is_the_weighted_sum_of_z_scores(valid: Scored) -> None:
    hist, _, scores, pair = valid
    table = candidate_table(scores, pair, hist, top_k=5, pair="ease")
    fused = table.with_fusion({"ease": 0.75, "itemknn": 0.25, "pop": 0.0})
    again = fused.with_fusion({"ease": 1.0})
    expected = 0.75 * column(table, "ease_z") + 0.25 * column(table, "itemknn_z")
    np.testing.assert_allclose(column(fused, "fused_z"), expected, rtol=1e-5)
    assert again.names.count("fused_z") == 1
    np.testing.assert_allclose(column(again, "fused_z"), column(table, "ease_z"))


def test_ties_in_the_ranker_are_broken_by_the_weighted_fusion(valid: Scored) -> None:
    hist, targets, scores, pair = valid
    table = candidate_table(scores, pair, hist, targets, top_k=5, pair="ease")
    table = table.with_fusion({"ease": 1.0})
    flat = np.zeros(len(table.items))
    # A constant ranker orders every user's candidates as EASE does.
    z = table.features[:, table.names.index("fused_z")]
    for u in np.unique(table.users):
        mine = np.flatnonzero(table.users == u)
        np.testing.assert_array_equal(table.order(flat)[mine], np.argsort(np.argsort(-z[mine])))
    ndcg = table_ndcg(table, flat, len(hist))
    assert ndcg.shape == (len(hist),)
    assert ndcg[np.setdiff1d(np.arange(len(hist)), table.users[table.labels > 0])].sum() == 0.0


def test_the_ranker_learns_which_part_to_trust() -> None:
    split = _cycle_split()
    parts = {"ease": _Noise(split.n_items, 1), "itemknn": _Oracle(split)}
    hist, targets = split.histories("valid"), split.targets("valid")
    scores, pair = score_parts(parts, hist, None)
    table = candidate_table(scores, pair, hist, targets, top_k=3)
    cv = cross_validate(standardised(scores), table, hist, targets, folds=3, params=TINY)
    assert cv.means()["ltr"] > 0.9
    assert cv.means()["single"] == pytest.approx(1.0)  # the oracle, chosen on the other folds
    with pytest.raises(ValueError, match="with_fusion"):
        train_ranker(table, TINY, rounds=10)
    booster, _ = train_ranker(table.with_fusion({"itemknn": 1.0}), TINY, rounds=10)
    ltr = LtrFusion(parts, booster, {"itemknn": 1.0}, TINY, top_k=3)
    test_hist = split.histories("test")
    out = ltr.score(test_hist)
    assert out.shape == (len(test_hist), split.n_items)
    assert (out.argmax(axis=1) == split.targets("test")).mean() > 0.9


@pytest.mark.parametrize(
    ("ndcg", "expected"),
    [
        ({"single": 0.10, "fused": 0.12, "ltr": 0.11}, "fused"),
        ({"single": 0.10, "fused": 0.12, "ltr": 0.13}, "ltr"),
        ({"single": 0.10, "fused": 0.09, "ltr": 0.095}, "single"),
        ({"single": 0.10, "fused": 0.10, "ltr": 0.10}, "single"),  # ties keep the simpler
        ({"single": 0.10, "fused": 0.10005, "ltr": 0.09}, "single"),  # below the minimum gain
        ({"single": 0.10, "ltr": 0.11}, "ltr"),
    ],
)
def test_choice_rule_picks_the_best_on_validation(ndcg: dict[str, float], expected: str) -> None:
    chosen = choose(ndcg)
    assert chosen == expected
    assert ndcg[chosen] >= ndcg["single"]
    assert chosen in CHOICES


def test_fit_chooses_by_cross_validation_and_never_below_the_best_single() -> None:
    split = _cycle_split()
    parts = {"ease": _Noise(split.n_items, 1), "itemknn": _Oracle(split)}
    fit = fit_ltr(parts, split, {"itemknn": 1.0}, params=TINY, repeats=2, top_k=3)
    cv = fit.summary["cv_valid_ndcg@10"]
    assert fit.chosen == choose(cv)
    assert cv[fit.chosen] >= cv["single"]
    assert {n: float(v.mean()) for n, v in fit.cv_ndcg.items()} == pytest.approx(cv)
    assert len(fit.summary["cv_repeats"]) == 2
    assert fit.model.score(split.histories("test")).shape == (len(split.eval_users), split.n_items)
