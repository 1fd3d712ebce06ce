"""The fold agent against the real Kafka and Redis: profiles, replays, ordering, dead letters."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
import pytest

from cli.supervise import free_port
from schemas import ClickEvent, DwellEvent, ProfileChanged, ViewEvent, parse_event
from streams.fold import FoldParams, ReferenceProfile, Weights, reference_fold
from streams.settings import StreamsSettings
from tests.conftest import Namespace
from tests.integration.streams_support import (
    Consumed,
    Worker,
    consume,
    counts,
    event,
    load_test_catalog,
    produce,
    produce_events,
    profiles,
    trend_counts,
    users_per_item,
    wait_for,
)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
NOW = datetime(2040, 1, 1, tzinfo=UTC)
AnyEvent = ClickEvent | ViewEvent | DwellEvent


def traffic(users: list[str], per_user: int, start: int = 0) -> list[dict[str, object]]:
    """Interleaved events: user u's n-th event is at T0 + 60 n, cycling items and types."""
    items, kinds = "abcde", ("view", "click", "dwell")
    out = []
    for n in range(start, start + per_user):
        for u_index, user in enumerate(users):
            kind = kinds[(n + u_index) % 3]
            out.append(
                event(
                    f"{user}-{n}",
                    user,
                    items[(n * 7 + u_index) % 5],
                    T0 + 60 * n,
                    kind,
                    dwell_ms=(n % 9) * 10_000,
                )
            )
    return out


def expected_profiles(
    events: list[dict[str, object]], catalog: dict[str, tuple[str, ...]]
) -> dict[str, ReferenceProfile]:
    by_user: dict[str, list[AnyEvent]] = {}
    for body in events:
        parsed = parse_event(orjson.dumps(body), now=NOW)
        by_user.setdefault(parsed.user_id, []).append(parsed)
    defaults = StreamsSettings()
    weights, params = Weights.from_settings(defaults), FoldParams.from_settings(defaults)
    return {u: reference_fold([evs], catalog, weights, params) for u, evs in by_user.items()}


def assert_matches_reference(
    ns: Namespace, events: list[dict[str, object]], catalog: dict[str, tuple[str, ...]]
) -> None:
    expected = expected_profiles(events, catalog)
    stored = profiles(ns.settings, expected)
    for user, ref in expected.items():
        got = stored[user]
        assert got is not None, user
        assert got.event_count == ref.event_count
        assert got.item_weights == pytest.approx(ref.item_weights, rel=1e-9)
        assert got.category_affinities == pytest.approx(ref.category_affinities, rel=1e-9)
        assert got.recent_items == ref.recent_items(50)
        assert got.last_event_ts.timestamp() == ref.reference_ts


def test_events_in_profiles_and_changes_out(ns: Namespace, workers: Callable[..., Worker]) -> None:
    catalog = load_test_catalog(ns.settings)
    users = ["alice", "bob", "carol"]
    events = traffic(users, 20)
    produce_events(ns.settings, events)
    workers()
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 20), "profiles folded")
    assert_matches_reference(ns, events, catalog)

    def all_items_announced(records: list[Consumed]) -> bool:
        seen: dict[str, set[str]] = {u: set() for u in users}
        for r in records:
            change = ProfileChanged.model_validate_json(r.value)
            seen[change.user_id].update(change.changes.new_items)
        return all(len(seen[u]) == 5 for u in users)

    changes = consume(ns.settings.topic_profiles_changed, ns.settings, all_items_announced)
    versions: dict[str, list[int]] = {}
    for record in changes:
        change = ProfileChanged.model_validate_json(record.value)
        assert record.key == change.user_id.encode()
        versions.setdefault(change.user_id, []).append(change.profile_version)
        assert T0 <= change.trigger_ts.timestamp() <= T0 + 60 * 19
    for user in users:
        assert versions[user] == sorted(set(versions[user])), "versions must strictly increase"


def test_replaying_the_same_events_changes_nothing(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    catalog = load_test_catalog(ns.settings)
    users = ["u1", "u2", "u3", "u4"]
    events = traffic(users, 15)
    produce_events(ns.settings, events)
    workers()
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 15), "first pass")
    before = profiles(ns.settings, users)
    # Recent popularity: one per user and item, however often the user touched it.
    assert trend_counts(ns.settings, T0) == users_per_item(events) == dict.fromkeys("abcde", 4)
    produce_events(ns.settings, events)  # the replay: same event ids
    # One new event per user after the replay: the replay is done once these are folded,
    # because a user's events share a partition and are consumed in order.
    sentinels = [event(f"{u}-sentinel", u, "e", T0 + 60 * 15, "view") for u in users]
    produce_events(ns.settings, sentinels)
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 16), "sentinels")
    after = profiles(ns.settings, users)
    for user in users:
        old, new = before[user], after[user]
        assert old is not None and new is not None
        assert new.version == old.version + 1, "the replay itself must not bump the version"
    assert_matches_reference(ns, events + sentinels, catalog)
    assert trend_counts(ns.settings, T0) == users_per_item(events), "a replay counts nothing"


@pytest.mark.parametrize("ns", [4], indirect=True)
def test_per_user_order_across_partitions_and_two_workers(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    catalog = load_test_catalog(ns.settings)
    users = [f"user{n}" for n in range(12)]
    workers(RECSTREAM_STREAMS_BATCH_SIZE="25")
    workers(RECSTREAM_STREAMS_BATCH_SIZE="25")
    events = traffic(users, 40)
    produce_events(ns.settings, events)
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 40), "all folded", 60)
    assert_matches_reference(ns, events, catalog)
    stored = profiles(ns.settings, users)
    changes = consume(
        ns.settings.topic_profiles_changed,
        ns.settings,
        lambda records: (
            {ProfileChanged.model_validate_json(r.value).user_id for r in records} >= set(users)
        ),
    )
    partitions: dict[str, set[int]] = {}
    last: dict[str, tuple[int, float]] = {}
    for record in changes:
        change = ProfileChanged.model_validate_json(record.value)
        partitions.setdefault(change.user_id, set()).add(record.partition)
        version, trigger = change.profile_version, change.trigger_ts.timestamp()
        prev_version, prev_trigger = last.get(change.user_id, (0, 0.0))
        # In order per user: versions grow and so does the newest event time behind them.
        assert version > prev_version
        assert trigger >= prev_trigger
        last[change.user_id] = (version, trigger)
    assert all(len(p) == 1 for p in partitions.values()), "a user's changes share a partition"
    assert len({p for ps in partitions.values() for p in ps}) > 1, "users spread over partitions"
    for user in users:
        profile = stored[user]
        assert profile is not None
        assert last[user][0] <= profile.version


BAD_INPUTS: list[tuple[str, bytes | None, bytes]] = [
    ("bad_utf8", b"x", b'{"schema_version":1,"user_id":"\xff"}'),
    ("bad_json", b"x", b'{"schema_version": 1,'),
    ("not_object", b"x", b"[1,2,3]"),
    ("oversize", b"x", b'{"pad":"' + b"z" * 17_000 + b'"}'),
    (
        "unsupported_schema_version",
        b"x",
        orjson.dumps({**event("b1", "x", "a", T0), "schema_version": 9}),
    ),
    ("unknown_type", b"x", orjson.dumps({**event("b2", "x", "a", T0), "type": "purchase"})),
    (
        "missing_field",
        b"x",
        orjson.dumps({k: v for k, v in event("b3", "x", "a", T0).items() if k != "item_id"}),
    ),
    ("extra_field", b"x", orjson.dumps({**event("b4", "x", "a", T0), "price": 3})),
    ("bad_id", b"x", orjson.dumps(event("b5", "x", "a\u0007", T0))),
    ("bad_ts", b"x", orjson.dumps({**event("b6", "x", "a", T0), "ts": "2023-11-14 22:13:20"})),
    ("ts_in_future", b"x", orjson.dumps(event("b7", "x", "a", 4_000_000_000.0))),
    ("dwell_rules", b"x", orjson.dumps({**event("b8", "x", "a", T0), "type": "dwell"})),
    ("dwell_rules", b"x", orjson.dumps({**event("b9", "x", "a", T0), "dwell_ms": 5})),
    ("bad_context", b"x", orjson.dumps({**event("b10", "x", "a", T0), "context": {"k": [1]}})),
    ("key_mismatch", b"y", orjson.dumps(event("b11", "x", "a", T0))),
    ("missing_key", None, orjson.dumps(event("b12", "x", "a", T0))),
]


def test_bad_input_is_dead_lettered_and_good_traffic_flows(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    catalog = load_test_catalog(ns.settings)
    users = ["g1", "g2", "g3"]
    good = traffic(users, 16)
    mixed: list[tuple[bytes | None, bytes]] = []
    for n, body in enumerate(good):
        mixed.append((str(body["user_id"]).encode(), orjson.dumps(body)))
        if n % 3 == 0 and n // 3 < len(BAD_INPUTS):
            _, key, value = BAD_INPUTS[n // 3]
            mixed.append((key, value))
    assert len({reason for reason, _, _ in BAD_INPUTS}) >= 10
    produce(ns.settings, mixed)
    port = free_port()
    workers(RECSTREAM_STREAMS_METRICS_PORT=str(port))
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 16), "good events")
    assert_matches_reference(ns, good, catalog)

    dead = consume(ns.settings.topic_dlq, ns.settings, lambda rs: len(rs) >= len(BAD_INPUTS))
    source = {
        (r.partition, r.offset): r
        for r in consume(
            ns.settings.topic_clickstream, ns.settings, lambda rs: len(rs) >= len(mixed)
        )
    }
    got = sorted((r.headers["dlq.reason"].decode(), r.value) for r in dead)
    assert got == sorted((reason, value) for reason, _, value in BAD_INPUTS)
    for record in dead:
        assert record.headers["dlq.source.topic"].decode() == ns.settings.topic_clickstream
        origin = source[
            (int(record.headers["dlq.source.partition"]), int(record.headers["dlq.source.offset"]))
        ]
        assert origin.value == record.value and origin.key == record.key
        assert record.headers["dlq.detail"]

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        exposition = reply.read().decode()
    assert 'recs_stream_dead_lettered_total{reason="key_mismatch"} 1.0' in exposition
    assert 'recs_stream_dead_lettered_total{reason="missing_key"} 1.0' in exposition
    assert 'recs_stream_dead_lettered_total{reason="oversize"} 1.0' in exposition
    assert "recs_stream_events_folded_total 48.0" in exposition
    assert "recs_stream_fold_latency_seconds_bucket" in exposition


def test_restarted_worker_neither_loses_nor_double_counts(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    catalog = load_test_catalog(ns.settings)
    users = [f"r{n}" for n in range(10)]
    first = traffic(users, 30)
    produce_events(ns.settings, first)
    worker = workers(RECSTREAM_STREAMS_BATCH_SIZE="20")
    wait_for(lambda: sum(counts(ns.settings, users).values()) >= 60, "some progress")
    assert worker.stop() == 0, "the worker must exit cleanly on SIGTERM"
    second = traffic(users, 10, start=30)
    produce_events(ns.settings, second)
    workers(RECSTREAM_STREAMS_BATCH_SIZE="20")
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 40), "all folded")
    assert_matches_reference(ns, first + second, catalog)


def test_unreachable_redis_stops_the_worker_without_losing_events(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    catalog = load_test_catalog(ns.settings)
    users = ["s1", "s2"]
    events = traffic(users, 10)
    produce_events(ns.settings, events)
    broken = workers(
        RECSTREAM_REDIS_URL="redis://127.0.0.1:1/0", RECSTREAM_STREAMS_REDIS_RETRY_S="1"
    )
    assert broken.proc is not None
    assert broken.proc.wait(60) == 70, broken.log_tail()
    assert "stopping without committing" in broken.log_tail()
    workers()
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 10), "all folded")
    assert_matches_reference(ns, events, catalog)
