"""The regeneration service's window of recent popularity, read from the stream worker's per-day
counts in Redis: summed over the artifact's days, ending on the latest change's day, re-read on
time, and never a reason to fail."""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from prometheus_client import REGISTRY

from consumers import RecentCounts
from recstream.keys import Keys
from recstream.security import redis_client
from streams.trending import DAY_S
from tests.conftest import Namespace

TODAY = 20_000  # days since the epoch: 2024-10-04


class _Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _at(day: int, hour: float = 12.0) -> datetime:
    return datetime.fromtimestamp(day * DAY_S + hour * 3600, UTC)


def test_the_window_ends_on_the_arriving_changes_day_and_is_read_again_on_time(
    ns: Namespace,
) -> None:
    keys = Keys(ns.settings.key_prefix)
    client = redis_client(ns.settings)
    clock, wall = _Clock(), _Clock((TODAY + 1) * DAY_S)
    try:
        for back in range(40):  # one count of "a" every day, and "old" 35 days back
            client.hset(keys.trending(TODAY - back), "a", 1)
        client.hset(keys.trending(TODAY - 35), "old", 9)
        junk = {"junk": "x", "neg": -2, "huge": "9" * 400}  # nothing the fold writes
        client.hset(keys.trending(TODAY), mapping={"b": 3, **junk})
        window = RecentCounts(
            client, keys, 30, refresh_s=5.0, settled_s=600.0, clock=clock, wall=wall
        )
        assert not window.due() and window.read() is None  # no change seen: no window yet
        window.saw(_at(TODAY - 3))
        window.saw(_at(TODAY))
        window.saw(_at(TODAY - 9))  # an older change among them does not move the window back
        assert window.due()
        assert window.read() == {"a": 30, "b": 3}
        assert window.latest == TODAY and not window.due()
        client.hincrby(keys.trending(TODAY), "b", 1)  # today: read again after refresh_s
        client.hincrby(keys.trending(TODAY - 10), "c", 5)  # settled: after settled_s
        clock.now = 5.0
        assert window.due() and window.read() == {"a": 30, "b": 4}
        clock.now = 600.0
        assert window.read() == {"a": 30, "b": 4, "c": 5}
        window.saw(_at(TODAY + 1))  # a new day: the window moves on by one
        client.hset(keys.trending(TODAY + 1), "d", 2)
        assert window.read() == {"a": 29, "b": 4, "c": 5, "d": 2}
        clock.now = 605.0
        assert window.read() == {"a": 29, "b": 4, "c": 5, "d": 2}  # no change since: it stays
        window.saw(_at(TODAY + 400))  # past tomorrow on the wall clock: not believed
        clock.now = 610.0
        window.read()
        assert window.latest == TODAY + 2
        # Mostly older changes arriving (a replay of earlier events, a conversation turn stamped
        # now among them): the window follows the replay.
        for _ in range(3):
            window.saw(_at(TODAY - 20))
        window.saw(_at(TODAY))
        clock.now = 615.0
        assert window.read() == {"a": 20, "old": 9} and window.latest == TODAY - 20
    finally:
        client.delete(*(keys.trending(TODAY + n) for n in range(-40, 3)))
        client.close()


def test_an_unreachable_redis_keeps_no_window_and_is_counted(ns: Namespace) -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    name = "recs_regen_trending_read_failures_total"
    before = REGISTRY.get_sample_value(name) or 0.0
    window = RecentCounts(dead, Keys(ns.settings.key_prefix), 30)
    window.saw(datetime.now(UTC))
    assert window.read() is None
    assert (REGISTRY.get_sample_value(name) or 0.0) - before == 1
