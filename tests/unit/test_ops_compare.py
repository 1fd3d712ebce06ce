"""The comparison metrics of `recstream replay regen | compare`, on hand-computed cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import kendalltau

from ops.compare import compare, kendall_tau_union, overlap_at_k


def test_overlap_counts_shared_items_over_k() -> None:
    assert overlap_at_k(["a", "b", "c"], ["c", "a", "b"], 3) == 1.0
    assert overlap_at_k(["a", "b", "c"], ["a", "x", "y"], 3) == pytest.approx(1 / 3)
    assert overlap_at_k(["a", "b"], ["c", "d"], 2) == 0.0
    # Only the top k count, and a short list still divides by k.
    assert overlap_at_k(["a", "b", "c", "d"], ["d", "c", "b", "a"], 2) == 0.0
    assert overlap_at_k(["a"], ["a"], 4) == 0.25
    with pytest.raises(ValueError, match="k must"):
        overlap_at_k(["a"], ["a"], 0)


def test_tau_of_identical_and_reversed_lists() -> None:
    assert kendall_tau_union(["a", "b", "c"], ["a", "b", "c"], 3) == 1.0
    assert kendall_tau_union(["a", "b", "c"], ["c", "b", "a"], 3) == -1.0


def test_tau_with_one_item_swapped_out() -> None:
    # Union a b c d; ranks A: 0 1 2 3(missing), B: 0 1 3(missing) 2. Of 6 pairs only (c, d)
    # is discordant: (5 - 1) / 6.
    assert kendall_tau_union(["a", "b", "c"], ["a", "b", "d"], 3) == pytest.approx(4 / 6)


def test_tau_of_disjoint_lists_uses_tie_correction() -> None:
    # Union a b c d; A ranks a=0 b=1 c=d=2, B ranks a=b=2 c=0 d=1. Concordant 0, discordant 4
    # ((a|b) x (c|d)); one tied pair in each ranking: tau-b = -4 / sqrt(5 * 5).
    assert kendall_tau_union(["a", "b"], ["c", "d"], 2) == pytest.approx(-0.8)


def test_tau_is_undefined_below_two_items() -> None:
    assert math.isnan(kendall_tau_union(["a"], ["a"], 3))
    assert math.isnan(kendall_tau_union([], [], 3))


@given(
    st.lists(st.sampled_from("abcdefghij"), unique=True, max_size=6),
    st.lists(st.sampled_from("abcdefghij"), unique=True, max_size=6),
)
def test_tau_matches_scipy_tau_b(a: list[str], b: list[str]) -> None:
    k = 5
    union = list(dict.fromkeys([*a[:k], *b[:k]]))
    ours = kendall_tau_union(a, b, k)
    if len(union) < 2:
        assert math.isnan(ours)
        return
    xs = [a[:k].index(i) if i in a[:k] else k for i in union]
    ys = [b[:k].index(i) if i in b[:k] else k for i in union]
    theirs = kendalltau(xs, ys, variant="b").statistic
    if math.isnan(theirs):
        assert math.isnan(ours)
    else:
        assert ours == pytest.approx(theirs)


def test_compare_aggregates_over_shared_users() -> None:
    live = {
        "same": ["a", "b", "c"],
        "reversed": ["a", "b", "c"],
        "swapped": ["a", "b", "c"],
        "only-live": ["a"],
    }
    replay = {
        "same": ["a", "b", "c"],
        "reversed": ["c", "b", "a"],
        "swapped": ["a", "b", "d"],
        "only-replay": ["a"],
    }
    result = compare(live, replay, 3)
    assert (result.users, result.only_a, result.only_b) == (3, 1, 1)
    assert result.overlap_mean == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert result.tau_mean == pytest.approx((1 - 1 + 4 / 6) / 3)
    assert result.tau_users == 3
    assert (result.changed, result.membership_changed) == (2, 1)
    text = "\n".join(result.describe("live", "replay"))
    assert "overlap@3 (mean): 0.8889" in text
    assert "changed: 2 (item set changed: 1)" in text


def test_compare_with_nothing_shared_reports_nan() -> None:
    result = compare({"u": ["a"]}, {"v": ["a"]}, 10)
    assert result.users == 0
    assert math.isnan(result.overlap_mean)
    assert "n/a" in result.describe()[1]
