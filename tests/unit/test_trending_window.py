"""The window of recent-popularity days a reader keeps (``streams.trending.Window``)."""

from __future__ import annotations

from streams.trending import Window, read_counts


def test_a_window_reads_new_days_at_once_and_old_ones_seldom() -> None:
    window = Window(3, refresh_s=5.0, settled_s=600.0)
    assert window.due(0.0) == [] and window.counts() is None  # no last day yet
    window.move(10)
    assert window.due(0.0) == [8, 9, 10]
    for day in (8, 9, 10):
        window.put(day, {"a": day}, 0.0)
    assert window.due(4.0) == []
    assert window.due(5.0) == [9, 10]  # the newest two still grow
    assert window.due(600.0) == [8, 9, 10]


def test_the_total_follows_the_days_put_replaced_and_dropped() -> None:
    window = Window(3, refresh_s=5.0, settled_s=600.0)
    window.move(10)
    window.put(8, {"a": 1, "b": 2}, 0.0)
    window.put(10, {"a": 4}, 0.0)
    first = window.counts()
    assert first == {"a": 5, "b": 2}
    assert window.counts() is first  # one snapshot while nothing changed
    window.put(10, {"a": 4}, 5.0)  # read again, the same: the same snapshot
    assert window.counts() is first
    window.put(10, {"a": 6, "c": 1}, 10.0)  # replaced, not added
    assert window.counts() == {"a": 7, "b": 2, "c": 1}
    assert first == {"a": 5, "b": 2}  # a snapshot handed out never changes
    window.move(11)  # day 8 leaves the window, and its counts the total
    assert window.counts() == {"a": 6, "c": 1}
    assert window.due(10.0) == [9, 11]
    window.move(20)
    assert window.counts() is None


def test_read_counts_keeps_only_what_the_stream_worker_could_have_written() -> None:
    fields = {
        b"a": b"3",
        b"junk": b"x",
        b"zero": b"0",
        b"neg": b"-2",
        b"huge": str(2**63).encode(),
        b"\xff": b"1",
    }
    assert read_counts(fields) == {"a": 3, "\ufffd": 1}
    assert read_counts(None) == {}
