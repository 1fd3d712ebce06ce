"""Dataset replay: the rating -> view/click/dwell mapping and deterministic event ids."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from lab.datasets import Dataset, Interaction
from ops.feed import count_events, events_for, replay_records
from schemas import DwellEvent, parse_event

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def dataset(digest: str = "abc") -> Dataset:
    return Dataset(
        "tiny",
        [
            Interaction("u1", "i1", 1_000_000_000.0, "rating", 4.0),
            Interaction("u2", "i2", 1_000_000_060.0, "rating", 0.5),
            Interaction("u1", "i3", 1_000_000_120.0, None, None),
            Interaction("u2", "i1", 1_000_000_180.0, "dwell", 5000.0),
        ],
        {},
        {"interactions.csv": digest},
    )


def test_a_rating_becomes_view_click_and_rating_scaled_dwell() -> None:
    events = list(events_for(0, dataset().interactions[0], b"tag"))
    assert [e["type"] for e in events] == ["view", "click", "dwell"]
    assert events[2]["dwell_ms"] == 96_000
    assert {e["ts"] for e in events} == {"2001-09-09T01:46:40+00:00"}
    assert len({e["event_id"] for e in events}) == 3


def test_records_are_valid_keyed_by_user_and_counted() -> None:
    data = dataset()
    records = list(replay_records(data))
    assert len(records) == count_events(data) == 3 + 3 + 2 + 1
    parsed = [parse_event(value, now=NOW) for _, value in records]
    assert all(
        key == event.user_id.encode() for (key, _), event in zip(records, parsed, strict=True)
    )
    dwells = [e for e in parsed if isinstance(e, DwellEvent)]
    assert [d.dwell_ms for d in dwells] == [96_000, 12_000, 5000]


def test_event_ids_are_deterministic_and_depend_on_the_data() -> None:
    first = [orjson.loads(v)["event_id"] for _, v in replay_records(dataset())]
    again = [orjson.loads(v)["event_id"] for _, v in replay_records(dataset())]
    other = [orjson.loads(v)["event_id"] for _, v in replay_records(dataset("xyz"))]
    assert first == again
    assert len(set(first)) == len(first)
    assert not set(first) & set(other)


def test_limit_caps_events() -> None:
    assert len(list(replay_records(dataset(), limit=4))) == 4
    assert count_events(dataset(), limit=4) == 4
