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

from collections.abc import Mapping

__all__ = ["DAY_S", "MAX_COUNT", "Window", "day_of", "read_counts"]

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


class Window:
    """A window of ``days`` whole days of counts as a reader keeps it (no I/O: the reader reads
    the days :meth:`due` names and gives them to :meth:`put`).

    It ends on :attr:`last` (:meth:`move`). Its newest two days are due again every
    ``refresh_s`` (they still grow), older ones every ``settled_s`` (few events arrive that
    late), a day never read at once. The total over its days is kept as they are put, so a
    read costs the size of the days read, not of the window; :meth:`counts` hands out one
    snapshot of it, the same object until a day changes.
    """

    def __init__(self, days: int, *, refresh_s: float, settled_s: float) -> None:
        self.days, self.refresh_s, self.settled_s = days, refresh_s, settled_s
        self.last: int | None = None
        self._held: dict[int, tuple[dict[str, int], float]] = {}  # day -> (counts, read at)
        self._total: dict[str, int] = {}
        self._snapshot: dict[str, int] | None = None

    def move(self, last: int) -> None:
        """End the window on day ``last``; the days it no longer covers are dropped."""
        self.last = last
        for day in [d for d in self._held if not last - self.days < d <= last]:
            self._add(self._held.pop(day)[0], -1)

    def due(self, now: float) -> list[int]:
        """The window's days to read (again) at ``now``."""
        if self.last is None:
            return []
        fresh = self.last - 1  # this day and later still grow
        return [
            d
            for d in range(self.last - self.days + 1, self.last + 1)
            if d not in self._held
            or now - self._held[d][1] >= (self.refresh_s if d >= fresh else self.settled_s)
        ]

    def put(self, day: int, counts: dict[str, int], now: float) -> None:
        """Day ``day``'s counts as read at ``now`` (:func:`read_counts`), in place of the last."""
        old = self._held.get(day)
        if old is not None and old[0] == counts:  # unchanged: the snapshot stands
            self._held[day] = (old[0], now)
            return
        if old is not None:
            self._add(old[0], -1)
        self._held[day] = (counts, now)
        self._add(counts, 1)

    def counts(self) -> dict[str, int] | None:
        """Each item's sum over the window's days read so far; ``None`` when none was."""
        if not self._held:
            return None
        if self._snapshot is None:
            self._snapshot = dict(self._total)
        return self._snapshot

    def _add(self, counts: Mapping[str, int], sign: int) -> None:
        if counts:
            self._snapshot = None
        total = self._total
        for item, n in counts.items():
            left = total.get(item, 0) + sign * n
            if left:
                total[item] = left
            else:
                total.pop(item, None)
