"""The fold's batch handler fed plain envelopes (Redis and Kafka replaced by recorders), and the
Faust adapter's side: turning Faust messages into envelopes, reporting lag."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from unittest.mock import ANY

import orjson
import pytest
import redis.asyncio
from redis.exceptions import NoPermissionError, OutOfMemoryError, ReadOnlyError, ResponseError

import streams
from recstream.metrics import RECORDS
from schemas import Envelope, ProfileChanged
from streams import ProfileFolder, metrics
from streams.app import envelopes, observe_lag
from streams.fold import Folded
from streams.folder import reply_class, transient
from streams.settings import StreamsSettings


def record(
    key: bytes | None, value: bytes, offset: int = 0, timestamp_ms: int | None = None
) -> Envelope:
    return Envelope("clickstream", 2, offset, key, value, timestamp_ms=timestamp_ms)


class FakeScript:
    def __init__(self) -> None:
        self.groups: list[Mapping[str, Sequence[tuple[Any, ...]]]] = []
        self.fields: list[Mapping[str, str] | None] = []

    async def run(
        self,
        groups: Mapping[str, Sequence[tuple[Any, ...]]],
        progress: object = None,
        fields: Mapping[str, str] | None = None,
    ) -> list[Folded]:
        self.groups.append(groups)
        self.fields.append(fields)
        return [
            Folded(user, 7, len(evs), 0, 0, True, 0.25, evs[-1][0], evs[-1][2], (evs[0][1],))
            for user, evs in groups.items()
        ]


def run_batch(
    records: list[Envelope],
) -> tuple[FakeScript, list[dict[str, Any]], list[dict[str, Any]]]:
    dlq: list[dict[str, Any]] = []
    changed: list[dict[str, Any]] = []

    async def send_dlq(**kwargs: Any) -> None:
        dlq.append(kwargs)

    async def send_changed(**kwargs: Any) -> None:
        changed.append(kwargs)

    async def go() -> FakeScript:
        client = redis.asyncio.Redis()
        folder = ProfileFolder(StreamsSettings(), client, send_dlq, send_changed)
        script = FakeScript()
        folder.script = script  # type: ignore[assignment]  # a recorder instead of Redis
        await folder.handle(records)
        await client.aclose()
        return script

    return asyncio.run(go()), dlq, changed


def click(user: str, eid: str, ts: str = "2024-01-01T00:00:00Z") -> bytes:
    return orjson.dumps(
        {
            "schema_version": 1,
            "event_id": eid,
            "type": "click",
            "user_id": user,
            "item_id": "i",
            "ts": ts,
        }
    )


def test_valid_events_are_grouped_and_changes_follow_the_contract() -> None:
    records = [
        record(b"u1", click("u1", "e1"), offset=1, timestamp_ms=1_700_000_000_000),
        record(b"u2", click("u2", "e2"), offset=2),
        record(b"u1", click("u1", "e3", "2024-01-01T00:01:00Z"), 3, 1_700_000_002_500),
    ]
    out = metrics.EVENTS_OUT.labels(StreamsSettings().topic_profiles_changed)
    before = out._value.get()
    script, dlq, changed = run_batch(records)
    assert out._value.get() - before == 2  # one change per user
    # The change carries the produce time of the user's newest record; none when unknown.
    assert dict(changed[0]["headers"]) == {metrics.ORIGIN_HEADER: b"1700000002500"}
    assert changed[1]["headers"] is None
    assert dlq == []
    (groups,) = script.groups
    assert list(groups) == ["u1", "u2"]
    assert [e[0] for e in groups["u1"]] == ["e1", "e3"]
    assert groups["u1"][0][3] == 2.0  # a click's weight
    # Each event travels with its offset, each user with its partition (the erasure check).
    assert [e[4] for e in groups["u1"]] == [r.offset for r in records if r.key == b"u1"]
    assert script.fields[0] == {"u1": f"{records[0].topic}:{records[0].partition}", "u2": ANY}
    assert [c["key"] for c in changed] == [b"u1", b"u2"]
    first = ProfileChanged.model_validate_json(changed[0]["value"])
    assert first.profile_version == 7
    assert first.event_id == "e3"
    assert first.trigger_ts.timestamp() == 1704067260.0
    assert first.changes.new_items == ["i"]
    assert first.changes.events == 2


def test_bad_records_are_dead_lettered_with_original_bytes_and_source() -> None:
    bad = b'{"schema_version": 1'
    records = [
        record(b"u1", bad, offset=41),
        record(b"zz", click("u1", "e1"), offset=42),
        record(b"u1", click("u1", "e2"), offset=43),
    ]
    dead = metrics.EVENTS_OUT.labels(StreamsSettings().topic_dlq)
    before = dead._value.get()
    script, dlq, _ = run_batch(records)
    assert dead._value.get() - before == 2
    assert [d["value"] for d in dlq] == [bad, records[1].value]
    headers = [dict(d["headers"]) for d in dlq]
    assert [h["dlq.reason"] for h in headers] == [b"bad_json", b"key_mismatch"]
    assert [h["dlq.source.offset"] for h in headers] == [b"41", b"42"]
    assert all(h["dlq.source.topic"] == b"clickstream" for h in headers)
    assert all(h["dlq.source.partition"] == b"2" for h in headers)
    assert [d["key"] for d in dlq] == [b"u1", b"zz"]
    assert [e[0] for e in script.groups[0]["u1"]] == ["e2"]


def test_public_surface() -> None:
    for name in streams.__all__:
        assert hasattr(streams, name), name


def test_the_fold_loads_without_faust() -> None:
    # The fold is plain code: only the Faust adapter (streams.app, streams.consumer) loads Faust.
    probe = (
        "import sys, streams, streams.folder; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('faust', 'aiokafka')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@dataclass
class FaustMessage:
    """The attributes of a Faust ``Message`` that the adapter reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] | None
    timestamp: float | None  # Faust keeps the Kafka timestamp in seconds


def test_faust_messages_become_envelopes_with_millisecond_timestamps() -> None:
    message = FaustMessage("clicks", 3, 17, b"u", b"{}", [("h", b"v")], 1_700_000_002.5)
    bare = FaustMessage("clicks", 0, 0, None, b"", None, None)
    assert envelopes([message, bare]) == [
        Envelope("clicks", 3, 17, b"u", b"{}", (("h", b"v"),), 1_700_000_002_500),
        Envelope("clicks", 0, 0, None, b""),
    ]


def test_observe_many_matches_observe() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from streams.metrics import observe_many

    values = [0.0, 0.001, 0.0015, 0.5, 0.5, 2.0, 99.0]
    expositions = []
    for bulk in (False, True):
        registry = CollectorRegistry()
        hist = Histogram("t_seconds", "t", buckets=(0.001, 0.5, 1.0), registry=registry)
        if bulk:
            observe_many(hist, values)
        else:
            for value in values:
                hist.observe(value)
        expositions.append(
            b"\n".join(
                line for line in generate_latest(registry).splitlines() if b"_created" not in line
            )
        )
    assert expositions[0] == expositions[1]
    assert b't_seconds_bucket{le="0.5"} 5.0' in expositions[1]


def test_overlapping_batches_fold_in_call_order() -> None:
    async def slow_dlq(**_: Any) -> None:
        await asyncio.sleep(0.05)  # the first batch is held up while validating

    async def no_changes(**_: Any) -> None:
        return None

    async def go() -> list[list[str]]:
        client = redis.asyncio.Redis()
        folder = ProfileFolder(StreamsSettings(), client, slow_dlq, no_changes)
        script = FakeScript()
        folder.script = script  # type: ignore[assignment]  # a recorder instead of Redis
        first = [record(b"u1", b"not json"), record(b"u1", click("u1", "a"))]
        second = [record(b"u1", click("u1", "b"))]
        await asyncio.gather(folder.handle(first), folder.handle(second))
        await client.aclose()
        return [[e[0] for e in groups["u1"]] for groups in script.groups]

    assert asyncio.run(go()) == [["a"], ["b"]]


@dataclass(frozen=True, order=True)
class FakeTP:
    topic: str
    partition: int


class FakeFaustConsumer:
    """Assignment, cached high watermarks, read offsets and positions of a Faust consumer."""

    def __init__(self) -> None:
        self.tps = {FakeTP("clicks-lag", 0), FakeTP("clicks-lag", 1), FakeTP("clicks-lag", 2)}
        self.highwaters: dict[FakeTP, int | None] = {
            FakeTP("clicks-lag", 0): 100,
            FakeTP("clicks-lag", 1): 40,
            FakeTP("clicks-lag", 2): None,  # no fetch yet
        }
        self._read_offset: dict[FakeTP, int | None] = {FakeTP("clicks-lag", 0): 89}

    def assignment(self) -> set[FakeTP]:
        return set(self.tps)

    def highwater(self, tp: FakeTP) -> int | None:
        return self.highwaters[tp]

    async def position(self, tp: FakeTP) -> int:
        return 25  # nothing handed over yet: the fetch position


def lag_series(group: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["topic"], s.labels["partition"]): s.value
        for family in metrics.CONSUMER_LAG.collect()
        for s in family.samples
        if s.labels["group"] == group
    }


def test_lag_per_partition_from_cached_watermarks_and_read_offsets() -> None:
    consumer = FakeFaustConsumer()
    assert asyncio.run(observe_lag(consumer, "lag-test")) == 2
    assert lag_series("lag-test") == {("clicks-lag", "0"): 10.0, ("clicks-lag", "1"): 15.0}
    # After a rebalance takes partition 1 away its series goes, the others are updated.
    consumer.tps.discard(FakeTP("clicks-lag", 1))
    consumer._read_offset[FakeTP("clicks-lag", 0)] = 99
    consumer.highwaters[FakeTP("clicks-lag", 2)] = 30
    assert asyncio.run(observe_lag(consumer, "lag-test")) == 2
    assert lag_series("lag-test") == {("clicks-lag", "0"): 0.0, ("clicks-lag", "2"): 5.0}


def test_every_record_of_a_mixed_batch_is_counted_once() -> None:
    def total(outcome: str) -> float:
        return float(RECORDS.labels("streams", "clickstream", outcome)._value.get())

    before = {o: total(o) for o in ("in", "folded", "duplicate", "dead_lettered")}
    records = [
        record(b"u1", click("u1", "e1")),
        # A tombstone: Kafka hands over None although Envelope.value is typed bytes.
        Envelope("clickstream", 2, 1, b"u1", None),
        record(None, click("u1", "e2")),  # no key
        record(b"u1", click("u1", "e3", "0001-01-01T00:00:00+01:00")),  # year 1
        record(b"u1", b"[]"),
        record(b"u2", click("u2", "e4")),
    ]
    _, dlq, _ = run_batch(records)
    reasons = [dict(d["headers"])["dlq.reason"] for d in dlq]
    assert reasons == [b"tombstone", b"missing_key", b"bad_ts", b"not_object"]
    assert dlq[0]["value"] == b""  # a tombstone has no bytes to keep
    delta = {o: total(o) - before[o] for o in before}
    assert delta == {"in": 6, "folded": 2, "duplicate": 0, "dead_lettered": 4}


@pytest.mark.parametrize(
    ("error", "is_transient", "name"),
    [
        (OutOfMemoryError("command not allowed when used memory"), True, "OutOfMemoryError"),
        (ReadOnlyError("You can't write against a read only replica."), True, "ReadOnlyError"),
        (ResponseError("BUSY Redis is busy running a script"), True, "BUSY"),
        (ResponseError("MASTERDOWN Link with MASTER is down"), True, "MASTERDOWN"),
        (ResponseError("WRONGTYPE Operation against a key holding"), False, "WRONGTYPE"),
        (ResponseError("user_script:12: attempt to compare nil"), False, "ResponseError"),
        (NoPermissionError("no permissions to access the 'x' key"), False, "NoPermissionError"),
    ],
)
def test_redis_refusals_split_into_passing_states_and_data_refusals(
    error: ResponseError, is_transient: bool, name: str
) -> None:
    assert transient(error) is is_transient
    # The class names the refusal for the dead letter; Redis's message (keys, data) never does.
    assert reply_class(error) == name
