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

__all__ = ["DAY_S", "day_of"]

DAY_S = 86_400


def day_of(ts: float) -> int:
    """Whole UTC days since the epoch of an event time (seconds), as the fold script counts."""
    return int(ts // DAY_S)
