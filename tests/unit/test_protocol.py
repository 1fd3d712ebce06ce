"""The evaluation protocol: split rules and metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lab.datasets import Dataset, Interaction, Item, core_filter
from lab.protocol import (
    coverage_at,
    diversity_at,
    genre_jaccard,
    latency_summary,
    leave_one_out,
    metrics_from_ranks,
    ndcg_per_user,
    target_ranks,
)


def _ds(rows: list[tuple[str, str, float]], items: dict[str, Item] | None = None) -> Dataset:
    inter = [Interaction(u, i, ts) for u, i, ts in rows]
    inter.sort(key=lambda it: it.ts)
    cat = items or {i: Item(i, f"title {i}") for _, i, _ in rows}
    return Dataset("toy", inter, cat, {"interactions.csv": "ab" * 32})


def test_leave_one_out_is_time_ordered_and_ties_keep_file_order() -> None:
    rows = [
        ("u1", "a", 1.0),
        ("u1", "b", 3.0),
        ("u1", "c", 2.0),
        ("u1", "d", 3.0),  # same time as b, later in the file: b then d
        ("u2", "a", 5.0),
        ("u2", "b", 6.0),
    ]
    split = leave_one_out(_ds(rows))
    idx = split.item_index
    assert split.item_ids == ["a", "c", "b", "d"]
    assert list(split.train[0]) == [idx["a"], idx["c"]]
    assert split.valid_target[0] == idx["b"]
    assert split.test_target[0] == idx["d"]
    # u2 has two interactions: trains only, never evaluated.
    assert split.valid_target[1] == -1 and list(split.eval_users) == [0]
    assert [list(h) for h in split.histories("valid")] == [[idx["a"], idx["c"]]]
    assert [list(h) for h in split.histories("test")] == [[idx["a"], idx["c"], idx["b"]]]
    assert split.sha256 == {"interactions.csv": "ab" * 32}


def test_target_rank_masks_seen_items_and_counts_ties_against_target() -> None:
    scores = np.array([[0.9, 0.8, 0.5, 0.5, 0.1]])
    # Item 0 is seen, so item 1 is ranked first among the unseen: rank 0.
    assert target_ranks(scores, [np.array([0])], np.array([1]))[0] == 0
    # Items 2 and 3 tie: the target gets the worse place (items 1 and 3 above it).
    assert target_ranks(scores, [np.array([0])], np.array([2]))[0] == 2
    # A target already in the history cannot be ranked: a miss.
    assert target_ranks(scores, [np.array([1])], np.array([1]))[0] == 5


def test_metrics_match_hand_computed_values() -> None:
    ranks = np.array([0, 3, 9, 10, 50])
    m = metrics_from_ranks(ranks)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["r@10"] == m["hr@10"]
    assert m["p@5"] == pytest.approx((2 / 5) / 5)
    expected = (1 / math.log2(2) + 1 / math.log2(5) + 1 / math.log2(11)) / 5
    assert m["ndcg@10"] == pytest.approx(expected)
    assert ndcg_per_user(np.array([1]))[0] == pytest.approx(1 / math.log2(3))


def test_coverage_and_diversity() -> None:
    top = np.array([[0, 1], [1, 2]])
    assert coverage_at(top, 10) == pytest.approx(0.3)
    genres = [frozenset({"A"}), frozenset({"A", "B"}), frozenset({"C"})]
    assert genre_jaccard(genres[0], genres[1]) == pytest.approx(0.5)
    assert genre_jaccard(frozenset(), frozenset()) == 0.0
    # user 1: 1 - 0.5; user 2: 1 - 0 -> mean 0.75
    assert diversity_at(top, genres) == pytest.approx(0.75)


def test_latency_percentiles_in_milliseconds() -> None:
    out = latency_summary([0.001] * 99 + [0.101])
    assert out["latency_ms_p50"] == pytest.approx(1.0)
    assert 1.0 < out["latency_ms_p99"] <= 101.0


def test_core_filter_iterates_until_every_user_and_item_has_min_count() -> None:
    plan = {"u1": "acyb", "u2": "acb", "u3": "acb", "u4": "yz"}
    rows, t = [], 0.0
    for user, seq in plan.items():
        for item in seq:
            t += 1
            rows.append((user, item, t))
    items = {i: Item(i, i) for i in "acyz"}
    items["b"] = Item("b", "")  # untitled: dropped before counting
    # z (1) goes, then u4 (left with y only), then y (left with u1 only).
    out = core_filter(_ds(rows, items), 2, "toy-core")
    assert out.name == "toy-core"
    assert {(it.user_id, it.item_id) for it in out.interactions} == {
        (u, i) for u in ("u1", "u2", "u3") for i in "ac"
    }
    assert set(out.items) == {"a", "c"}


def test_subset_keeps_training_data_and_the_first_evaluated_users() -> None:
    rows = [
        (u, i, float(n))
        for n, (u, i) in enumerate((u, i) for u in ("u1", "u2", "u3") for i in "abcd")
    ]
    split = leave_one_out(_ds(rows))
    sub = split.subset(2)
    assert list(sub.eval_users) == [0, 1]
    assert [list(t) for t in sub.train] == [list(t) for t in split.train]
    assert list(sub.targets("test")) == list(split.targets("test")[:2])
