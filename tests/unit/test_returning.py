"""Recent popularity for returning users: when their lists are made again, what the lab judges
there, what the served model blends, and how the regeneration service queues those lists."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from consumers.coalesce import Coalescer
from inference.exceptions import ArtifactError
from inference.trending import (
    REFRESH_EVERY_S,
    REFRESH_HORIZON_S,
    TrendingConfig,
    refresh_moment,
)
from lab.baselines import PopularityRanker
from lab.protocol import Split
from lab.trending import DAY_S, RecentPopularity, at_targets, choose, heldout_grid
from tests.unit.test_trending import trend  # noqa: F401 - the module fixture

HOUR = 3_600.0
T0 = 1_600_000_000.0


def test_a_list_is_made_again_after_the_idle_time_then_daily_up_to_the_horizon() -> None:
    assert REFRESH_EVERY_S == DAY_S
    assert refresh_moment(T0, T0 + 5 * DAY_S, 0) is None  # 0: every list blends, none remade
    assert refresh_moment(T0, T0 + HOUR - 1, HOUR) is None  # the list made at T0 still stands
    assert refresh_moment(T0, T0 + HOUR, HOUR) == T0 + HOUR
    assert refresh_moment(T0, T0 + HOUR + DAY_S - 1, HOUR) == T0 + HOUR
    assert refresh_moment(T0, T0 + HOUR + DAY_S, HOUR) == T0 + HOUR + DAY_S
    assert refresh_moment(T0, T0 + 3 * DAY_S + 5, DAY_S) == T0 + 3 * DAY_S
    # Years later: the last remaking, no later than the horizon after the newest event.
    last = refresh_moment(T0, T0 + 900 * DAY_S, HOUR)
    assert last is not None and T0 + REFRESH_HORIZON_S - DAY_S < last <= T0 + REFRESH_HORIZON_S


def test_a_blend_for_returning_users_applies_only_to_lists_made_again() -> None:
    every = TrendingConfig(days=30, weight=4.0, below=4)
    back = TrendingConfig(days=30, weight=4.0, below=4, idle_s=int(HOUR))
    assert every.applies(2) and every.applies(2, returning=True) and not every.refreshes
    assert not back.applies(2) and back.applies(2, returning=True) and back.refreshes
    assert not back.applies(4, returning=True) and not back.applies(0, returning=True)
    assert not TrendingConfig(days=30, weight=0.0, below=4, idle_s=60).refreshes


def test_the_idle_time_is_signed_into_the_section_and_checked_when_read() -> None:
    back = TrendingConfig(days=30, weight=4.0, below=4, idle_s=int(DAY_S))
    section = back.to_json()
    assert section["idle_s"] == DAY_S and TrendingConfig.from_json(section) == back
    older = {k: v for k, v in section.items() if k != "idle_s"}
    assert TrendingConfig.from_json(older).idle_s == 0  # trained before: every list blends
    for bad in (-1, True, 1.5, "3600", 31 * DAY_S):
        with pytest.raises(ArtifactError):
            TrendingConfig.from_json({**section, "idle_s": bad})


def _fit(part: Split) -> PopularityRanker:
    return PopularityRanker().fit(part)


def test_held_out_targets_within_the_idle_time_keep_the_models_list(
    trend: tuple[object, Split, RecentPopularity],  # noqa: F811 - the fixture
) -> None:
    """Every user of the fixture spans nine days: away 30 days, no target is reached and each
    blend's cell is the model's own; away a second, the targets a day later are (with the
    counts of the day before theirs, the list's last remaking: here the wrong fashion)."""
    _, split, recent = trend
    idles = (0.0, 1.0, 30 * DAY_S)
    for upcoming in (False, True):
        grid = heldout_grid(
            split, recent, _fit, (1, 2), (1.0,), (8.0,), folds=3, upcoming=upcoming, idles=idles
        )
        for n in (1, 2):
            alone = grid[n, 0.0, 0.0, 0.0]
            assert np.array_equal(grid[n, 1.0, 8.0, 30 * DAY_S], alone)
            assert not np.array_equal(grid[n, 1.0, 8.0, 1.0], alone)


def test_eval_counts_a_returning_users_target_at_the_lists_last_remaking(
    trend: tuple[object, Split, RecentPopularity],  # noqa: F811 - the fixture
) -> None:
    _, split, recent = trend
    hist, rows = split.prefix_histories("test", 1)
    counted = at_targets(recent, split, "test", rows, 1.0, idle=HOUR, prefix=1)
    for row, u in zip(counted, split.eval_users[rows], strict=True):
        last, target = recent.times[u][0], recent.times[u][-1]
        remade = refresh_moment(last, target, HOUR)
        assert remade is not None  # every test item here is days after the first item
        assert np.array_equal(row, recent.scores(int(u), remade, 1.0))
    # Without an idle time: up to the target's own moment, as before.
    own = at_targets(recent, split, "test", rows, 1.0)
    u = int(split.eval_users[rows][0])
    assert np.array_equal(own[0], recent.scores(u, recent.times[u][-1], 1.0))
    assert len(hist) == len(rows)


def test_choose_keeps_a_blend_for_returning_users_when_every_list_would_cost_the_next_items(
    trend: tuple[object, Split, RecentPopularity],  # noqa: F811 - the fixture
) -> None:
    _, split, recent = trend
    days, weights, idles = (1.0,), (8.0,), (0.0, 1.0)
    later = heldout_grid(split, recent, _fit, (1, 2), days, weights, folds=3, idles=idles)
    guard = heldout_grid(
        split, recent, _fit, (1, 2), days, weights, folds=3, targets=2, upcoming=True, idles=idles
    )
    neutral, costly = dict(guard), dict(guard)
    for n in (1, 2):
        # The same gain on the later items either way (fashion of the target's own moment)...
        later[n, 1.0, 8.0, 1.0] = later[n, 1.0, 8.0, 0.0]
        for cell in ((1.0, 8.0, 0.0), (1.0, 8.0, 1.0)):
            neutral[(n, *cell)] = guard[n, 0.0, 0.0, 0.0]
        # ...but blending every list costs the next items; the lists made again do not.
        costly[n, 1.0, 8.0, 0.0] = guard[n, 0.0, 0.0, 0.0] - 0.5
        costly[n, 1.0, 8.0, 1.0] = guard[n, 0.0, 0.0, 0.0]
    first = choose(later, (1, 2), days, weights, guards=(neutral,), idles=idles)
    assert (first.weight, first.idle) == (8.0, 0.0)  # a tie: every list, nothing to remake
    pick = choose(later, (1, 2), days, weights, guards=(costly,), idles=idles)
    assert (pick.days, pick.weight, pick.idle) == (1.0, 8.0, 1.0)
    assert pick.gain == first.gain > 0.5 and pick.next_gain == 0.0


def test_a_returning_users_list_waits_behind_any_change_and_a_change_makes_it_an_ordinary_one() -> (
    None
):
    coalescer = Coalescer(0.0)
    at = datetime.fromtimestamp(T0, UTC)
    assert coalescer.refresh("u", T0, at, now=1.0)
    assert not coalescer.refresh("u", T0, at, now=1.0)  # already waiting
    (entry,) = coalescer.take_due(1.0, 10)
    assert entry.returning == T0 and entry.positions == [] and entry.version == 0
    running = coalescer.start(entry, read_version=3)
    assert running.returning
    assert not coalescer.refresh("u", T0, at, now=2.0)  # its list is being made
    coalescer.finish("u")
    coalescer.refresh("v", T0, at, now=3.0)
    coalescer.add("v", 5, at, ("profiles.changed", 0, 7), now=3.0)
    (merged,) = coalescer.take_due(3.0, 10)
    assert merged.returning is None and merged.positions == [("profiles.changed", 0, 7)]
