"""Recent popularity: per day, how many profiles took each item up (``Keys.trending``).

After a batch's fold has committed, the live worker adds each item that entered a user's
profile for the first time (``Folded.new_items``) to the count of the day of that user's newest
folded event (UTC days since the epoch, by event time), one pipeline per batch. The regeneration
service sums the artifact's window of days and blends it into short histories' lists
(``inference.trending``).

It counts **at most once**: a batch replayed after a crash finds its items already in the
profiles, so nothing is counted twice, and an increment lost to a crash between the fold and this
pipeline (or refused by Redis, ``recs_stream_trending_lost_total``) is not made up. A count is a
guess of what is popular, not an account: a small undercount after a crash is its whole cost,
and a Redis error here never holds back the fold. One user adds at most one to an item while
their profile holds it, so flooding one user's events cannot make an item trend.

Each day's hash expires ``streams_trending_keep_days`` after its last increment (wall clock).
The counts name no user: erasing a user leaves them (docs/privacy.md).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from recstream.keys import Keys
from streams import metrics
from streams.fold import Folded

__all__ = ["DAY_S", "TrendCounter", "day_of"]

log = logging.getLogger(__name__)

DAY_S = 86_400


def day_of(ts: float) -> int:
    """Whole UTC days since the epoch of an event time (seconds)."""
    return int(ts // DAY_S)


class TrendCounter:
    """Adds the items new to a profile to their day's count (at most once, never raising)."""

    def __init__(self, redis: Redis, keys: Keys, keep_days: int) -> None:
        self.redis, self.keys = redis, keys
        self.keep_s = keep_days * DAY_S

    async def add(self, folded: Iterable[Folded]) -> int:
        """Count ``folded``'s new items; returns how many Redis took (0 when it refused)."""
        days: dict[int, Counter[str]] = {}
        for result in folded:
            if result.new_items and not result.rejected:
                days.setdefault(day_of(result.trigger_ts), Counter()).update(result.new_items)
        total = sum(sum(c.values()) for c in days.values())
        if not total:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for day, items in days.items():
            key = self.keys.trending(day)
            for item, n in items.items():
                pipe.hincrby(key, item, n)
            pipe.expire(key, self.keep_s)
        try:
            await pipe.execute()
        except RedisError as exc:
            metrics.TRENDING_LOST.inc(total)
            log.warning("recent-popularity counts not taken (%d items): %s", total, exc)
            return 0
        metrics.TRENDING_COUNTED.inc(total)
        return total
