"""Recent popularity: per day, how many profiles took each item up (``Keys.trending``).

The live worker's fold (``streams/fold.lua``, :attr:`streams.fold.FoldParams.trending_ttl_s`)
adds each item that enters a user's profile for the first time (``Folded.new_items``) to the
count of the day of that user's newest folded event in the batch (:func:`day_of`: UTC days since
the epoch, by event time), in the same script as the fold itself. So the counts are exactly
once, like the profiles: a batch replayed after a crash finds its items already in the profiles
and counts nothing again, and a fold that did not commit counted nothing. One user adds at most
one to an item while their profile holds it, so flooding one user's events cannot make an item
trend. A rebuild (``recstream replay profiles``) does not count: that history was counted live.

Each day's hash expires ``streams_trending_keep_days`` after its last increment (wall clock).
The counts name no user: erasing a user leaves them (docs/privacy.md). The regeneration service
sums the artifact's window of days and blends it into short histories' lists
(``consumers.regenerate.RecentCounts``, ``inference.trending``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["DAY_S", "MAX_COUNT", "day_of", "read_counts", "sum_counts"]

DAY_S = 86_400
MAX_COUNT = 2**63 - 1  # HINCRBY's range: a larger "count" is nothing the stream worker wrote


def day_of(ts: float) -> int:
    """Whole UTC days since the epoch of an event time (seconds), as the fold script counts."""
    return int(ts // DAY_S)


def read_counts(fields: Mapping[bytes, bytes] | None) -> dict[str, int]:
    """One day's hash as read back (item -> count): values that are not counts (junk, 0 or
    less, beyond :data:`MAX_COUNT`) are nothing the stream worker wrote, and are left out."""
    counts: dict[str, int] = {}
    for item, value in (fields or {}).items():
        try:
            n = int(value)
        except (TypeError, ValueError):
            continue
        if 0 < n <= MAX_COUNT:
            counts[item.decode("utf-8", "replace")] = n
    return counts


def sum_counts(days: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """A window's counts: each item's sum over its days (:func:`read_counts`)."""
    total: dict[str, int] = {}
    for counts in days:
        for item, n in counts.items():
            total[item] = total.get(item, 0) + n
    return total
