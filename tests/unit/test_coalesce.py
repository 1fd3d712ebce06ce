"""Per-user coalescing and the committable-offset bookkeeping of the regeneration consumer."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from consumers.coalesce import Coalescer, OffsetTracker

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _ts(n: int) -> datetime:
    return T0 + timedelta(seconds=n)


def test_a_burst_inside_the_window_becomes_one_request_on_the_latest_version() -> None:
    c = Coalescer(debounce_s=0.05)
    for n in range(1, 51):
        c.add("u1", n, _ts(n), ("t", 0, n), now=0.001 * (n - 1))  # 50 changes in 49 ms
    assert c.take_due(now=0.049, limit=10) == []  # window measured from the first change
    (entry,) = c.take_due(now=0.0501, limit=10)
    assert (entry.user_id, entry.version, entry.trigger_ts) == ("u1", 50, _ts(50))
    assert entry.changes == 50
    assert [pos[2] for pos in entry.positions] == list(range(1, 51))
    assert len(c) == 0


def test_window_starts_at_the_first_change_so_a_stream_cannot_postpone_forever() -> None:
    c = Coalescer(debounce_s=0.02)
    c.add("u", 1, _ts(1), ("t", 0, 1), now=0.0)
    c.add("u", 2, _ts(2), ("t", 0, 2), now=0.019)
    assert [e.version for e in c.take_due(now=0.02, limit=5)] == [2]


def test_changes_covered_by_a_running_read_ride_along_and_newer_ones_wait() -> None:
    c = Coalescer(debounce_s=0.0)
    c.add("u", 3, _ts(3), ("t", 0, 10), now=0.0)
    (entry,) = c.take_due(now=0.0, limit=1)
    running = c.start(entry, read_version=5)  # the profile had moved on to version 5
    assert c.add("u", 4, _ts(4), ("t", 0, 11), now=0.1) is False  # stale: covered by v5
    assert running.trigger_ts == _ts(4)  # the list being computed reflects that event too
    assert c.add("u", 6, _ts(6), ("t", 0, 12), now=0.1) is True
    assert c.take_due(now=1.0, limit=5) == []  # one regeneration per user at a time
    assert [p[2] for p in running.positions] == [10, 11]
    assert c.finish("u") is running
    (after,) = c.take_due(now=1.0, limit=5)
    assert (after.version, [p[2] for p in after.positions]) == (6, [12])


def test_waiting_changes_already_covered_by_the_read_join_the_running_request() -> None:
    c = Coalescer(debounce_s=0.0)
    c.add("u", 1, _ts(1), ("t", 0, 1), now=0.0)
    (entry,) = c.take_due(now=0.0, limit=1)
    c.add("u", 2, _ts(2), ("t", 0, 2), now=0.0)  # arrives between take and start
    running = c.start(entry, read_version=2)
    assert len(c) == 0
    assert running.changes == 2


def test_put_back_keeps_the_window_and_merges() -> None:
    c = Coalescer(debounce_s=0.01)
    c.add("u", 1, _ts(1), ("t", 0, 1), now=0.0)
    (entry,) = c.take_due(now=0.02, limit=1)
    c.add("u", 2, _ts(2), ("t", 0, 2), now=0.03)
    c.put_back(entry)
    (merged,) = c.take_due(now=0.02, limit=1)
    assert (merged.version, [p[2] for p in merged.positions]) == (2, [1, 2])


def test_limit_and_revoke() -> None:
    c = Coalescer(debounce_s=0.0)
    for n in range(5):
        c.add(f"u{n}", 1, _ts(n), ("t", n % 2, n), now=float(n))
    assert [e.user_id for e in c.take_due(now=10.0, limit=2)] == ["u0", "u1"]
    assert c.forget([("t", 0)]) == 2  # u2, u4 live on partition 0
    assert [e.user_id for e in c.take_due(now=10.0, limit=9)] == ["u3"]


def test_timing_keeps_the_first_receipt_and_the_newest_origin() -> None:
    c = Coalescer(debounce_s=0.05)
    c.add("u", 1, _ts(1), ("t", 0, 1), now=1.0, origin_ts=500.0)
    c.add("u", 2, _ts(2), ("t", 0, 2), now=1.02)  # no header: the known origin stays
    c.add("u", 3, _ts(3), ("t", 0, 3), now=1.03, origin_ts=502.0)
    (entry,) = c.take_due(now=1.06, limit=5)
    assert (entry.received, entry.origin_ts) == (1.0, 502.0)
    running = c.start(entry, read_version=3)
    assert (running.received, running.origin_ts) == (1.0, 502.0)
    # A change the running read covers rides along and brings its newer origin.
    assert not c.add("u", 3, _ts(3), ("t", 0, 4), now=1.1, origin_ts=503.0)
    assert (running.received, running.origin_ts) == (1.0, 503.0)


def test_put_back_keeps_the_earliest_receipt() -> None:
    c = Coalescer(debounce_s=0.0)
    c.add("u", 1, _ts(1), ("t", 0, 1), now=2.0)
    (entry,) = c.take_due(now=2.0, limit=1)
    c.add("u", 2, _ts(2), ("t", 0, 2), now=3.0, origin_ts=9.0)
    c.put_back(entry)
    (merged,) = c.take_due(now=3.0, limit=1)
    assert (merged.received, merged.origin_ts, merged.version) == (2.0, 9.0, 2)


def test_committable_offset_is_the_lowest_unfinished_one() -> None:
    tracker = OffsetTracker()
    for offset in range(5, 10):
        tracker.received("t", 0, offset)
    assert tracker.committable("t", 0) == 5
    tracker.done("t", 0, 7)
    tracker.done("t", 0, 6)
    assert tracker.committable("t", 0) == 5  # 5 still open: a restart must re-read it
    tracker.done("t", 0, 5)
    assert tracker.committable("t", 0) == 8
    tracker.done("t", 0, 8)
    tracker.done("t", 0, 9)
    assert tracker.committable("t", 0) == 10
    assert tracker.committable("t", 1) is None
    assert tracker.open_count() == 0


@given(st.permutations(list(range(30))), st.integers(0, 30))
def test_committable_never_passes_an_open_offset(order: list[int], finished: int) -> None:
    tracker = OffsetTracker()
    for offset in range(30):
        tracker.received("t", 0, offset)
    done = order[:finished]
    for offset in done:
        tracker.done("t", 0, offset)
    still_open = set(range(30)) - set(done)
    expected = min(still_open) if still_open else 30
    assert tracker.committable("t", 0) == expected
