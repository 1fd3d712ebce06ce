"""Per-user coalescing of profile changes, and the offsets that are safe to commit.

Both pieces are plain data structures driven by the regeneration consumer's poll loop (one
thread), so they are unit-tested without Kafka.

:class:`Coalescer` holds, per user, the changes that wait for their debounce window (measured from
the first change of a burst, so a steady stream of changes cannot postpone a user forever) and at
most one regeneration in flight. A change whose version is already covered by the profile version
a running regeneration read is attached to it instead of causing another one: stale requests are
dropped, never served.

:class:`OffsetTracker` knows, per partition, which received offsets are not yet done (their result
published, or dropped on purpose). The committable offset is the lowest one still open, so a
restart re-reads exactly what was not finished (at-least-once).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["Coalescer", "InFlight", "OffsetTracker", "Pending", "TopicPartitionKey"]

TopicPartitionKey = tuple[str, int]
Position = tuple[str, int, int]  # topic, partition, offset


@dataclass
class Pending:
    """Changes for one user waiting for their window to close."""

    user_id: str
    version: int
    trigger_ts: datetime
    due: float
    positions: list[Position] = field(default_factory=list)
    changes: int = 0
    received: float = 0.0  # monotonic time the first of these changes was consumed
    origin_ts: float | None = None  # newest triggering record's produce time (epoch s), if known
    # For a list made again for a user who has been away, with no change behind it: when it was
    # due (event time, epoch s; consumers.returning). None once a change joins it.
    returning: float | None = None


@dataclass
class InFlight:
    """One user's running regeneration: the profile version it read and what it answers for."""

    user_id: str
    read_version: int
    trigger_ts: datetime
    positions: list[Position] = field(default_factory=list)
    changes: int = 0
    received: float = 0.0
    origin_ts: float | None = None
    returning: bool = False  # made again for a user who has been away, no change behind it


def _newest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


class Coalescer:
    """Debounces changes per user and keeps one regeneration per user in flight."""

    def __init__(self, debounce_s: float) -> None:
        self.debounce_s = debounce_s
        self.pending: dict[str, Pending] = {}
        self.inflight: dict[str, InFlight] = {}

    def add(
        self,
        user_id: str,
        version: int,
        trigger_ts: datetime,
        position: Position,
        now: float,
        *,
        origin_ts: float | None = None,
    ) -> bool:
        """Record one change; returns False when a running regeneration already covers it.

        ``origin_ts`` (epoch seconds) is the produce time of the clickstream record behind the
        change, when known; like ``trigger_ts``, the newest of a user's changes is kept.
        """
        running = self.inflight.get(user_id)
        if running is not None and version <= running.read_version:
            running.positions.append(position)
            running.changes += 1
            # The list being computed already reflects this change's event: say so.
            running.trigger_ts = max(running.trigger_ts, trigger_ts)
            running.origin_ts = _newest(running.origin_ts, origin_ts)
            return False
        entry = self.pending.get(user_id)
        if entry is None:
            entry = self.pending[user_id] = Pending(
                user_id, version, trigger_ts, due=now + self.debounce_s, received=now
            )
        elif version > entry.version:
            entry.version = version
        entry.trigger_ts = max(entry.trigger_ts, trigger_ts)
        entry.origin_ts = _newest(entry.origin_ts, origin_ts)
        entry.positions.append(position)
        entry.changes += 1
        entry.returning = None  # a change: the list is made as it is folded
        return True

    def refresh(self, user_id: str, due: float, trigger_ts: datetime, now: float) -> bool:
        """Queue a list made again for a user who has been away (``due``: when it was due, event
        time); False when the user already has work waiting or running, whose list comes
        anyway."""
        if user_id in self.pending or user_id in self.inflight:
            return False
        self.pending[user_id] = Pending(
            user_id, 0, trigger_ts, due=now, received=now, returning=due
        )
        return True

    def next_due(self) -> float | None:
        """When the earliest waiting user becomes due (ignoring users with work in flight)."""
        dues = [p.due for u, p in self.pending.items() if u not in self.inflight]
        return min(dues) if dues else None

    def take_due(self, now: float, limit: int, flush: bool = False) -> list[Pending]:
        """Remove and return up to ``limit`` users whose window closed (all if ``flush``)."""
        ready = sorted(
            (
                p
                for u, p in self.pending.items()
                if u not in self.inflight and (flush or p.due <= now)
            ),
            key=lambda p: p.due,
        )[:limit]
        for entry in ready:
            del self.pending[entry.user_id]
        return ready

    def put_back(self, entry: Pending) -> None:
        """Return an entry that could not be started (the pool was full); it keeps its due time."""
        current = self.pending.get(entry.user_id)
        if current is None:
            self.pending[entry.user_id] = entry
            return
        current.positions[:0] = entry.positions
        current.changes += entry.changes
        current.due = min(current.due, entry.due)
        current.version = max(current.version, entry.version)
        current.trigger_ts = max(current.trigger_ts, entry.trigger_ts)
        current.origin_ts = _newest(current.origin_ts, entry.origin_ts)
        current.received = min(current.received, entry.received)
        if entry.positions or current.positions:
            current.returning = None

    def start(self, entry: Pending, read_version: int) -> InFlight:
        """Mark a regeneration as running on the profile version it read."""
        running = InFlight(
            entry.user_id,
            read_version,
            entry.trigger_ts,
            list(entry.positions),
            entry.changes,
            received=entry.received,
            origin_ts=entry.origin_ts,
            returning=entry.returning is not None,
        )
        self.inflight[entry.user_id] = running
        # Changes that arrived meanwhile and that this read already covers ride along.
        waiting = self.pending.get(entry.user_id)
        if waiting is not None and waiting.version <= read_version:
            del self.pending[entry.user_id]
            running.positions += waiting.positions
            running.changes += waiting.changes
            running.trigger_ts = max(running.trigger_ts, waiting.trigger_ts)
            running.origin_ts = _newest(running.origin_ts, waiting.origin_ts)
        return running

    def finish(self, user_id: str) -> InFlight | None:
        return self.inflight.pop(user_id, None)

    def forget(self, partitions: Iterable[TopicPartitionKey]) -> int:
        """Drop waiting work of revoked partitions (the new owner re-reads it); returns users."""
        gone = set(partitions)
        users = [
            u
            for u, p in self.pending.items()
            if any((t, part) in gone for t, part, _ in p.positions)
        ]
        for user in users:
            del self.pending[user]
        for running in self.inflight.values():
            running.positions = [pos for pos in running.positions if pos[:2] not in gone]
        return len(users)

    def __len__(self) -> int:
        return len(self.pending)


class OffsetTracker:
    """Per-partition open offsets; the committable offset is the lowest still open."""

    def __init__(self) -> None:
        self._open: dict[TopicPartitionKey, list[int]] = {}
        self._done: dict[TopicPartitionKey, set[int]] = {}
        self._next: dict[TopicPartitionKey, int] = {}

    def received(self, topic: str, partition: int, offset: int) -> None:
        tp = (topic, partition)
        heapq.heappush(self._open.setdefault(tp, []), offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, topic: str, partition: int, offset: int) -> None:
        tp = (topic, partition)
        if tp in self._open:
            self._done.setdefault(tp, set()).add(offset)

    def committable(self, topic: str, partition: int) -> int | None:
        """The offset to store for this partition (next to read on restart), if any."""
        tp = (topic, partition)
        heap, done = self._open.get(tp), self._done.get(tp, set())
        if heap is None:
            return None
        while heap and heap[0] in done:
            done.discard(heapq.heappop(heap))
        return heap[0] if heap else self._next[tp]

    def open_count(self) -> int:
        return sum(len(h) - len(self._done.get(tp, ())) for tp, h in self._open.items())

    def partitions(self) -> list[TopicPartitionKey]:
        return list(self._open)

    def forget(self, partitions: Iterable[TopicPartitionKey]) -> None:
        for tp in partitions:
            self._open.pop(tp, None)
            self._done.pop(tp, None)
            self._next.pop(tp, None)
