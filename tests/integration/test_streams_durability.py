"""The stream worker's progress survives crashes and a Redis that comes back older or empty.

Real Kafka and Redis, the worker as a real process. The fold stores each partition's next offset
and its undelivered change notices in Redis in the same script as the profiles; these tests break
the worker or Redis at the worst moments and check that nothing is lost or folded twice.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import orjson
import pytest
import redis
import redis.asyncio
from confluent_kafka import Consumer, TopicPartition

from recstream.keys import Keys
from recstream.security import async_redis_client, kafka_config, redis_client
from schemas import ProfileChanged
from streams.fold import PROGRESS_LOST, FoldParams, FoldScript, Progress, pending_notice
from streams.folder import FORGET_DELIVERED_LUA
from tests.conftest import Namespace
from tests.integration.streams_support import (
    Worker,
    consume,
    counts,
    load_test_catalog,
    produce_events,
    profiles,
    trend_counts,
    users_per_item,
    wait_for,
)
from tests.integration.test_streams import T0, assert_matches_reference, traffic

pytestmark = pytest.mark.integration

KILL_BEFORE_ANNOUNCE = "RECSTREAM_STREAMS_FAULT_KILL_BEFORE_ANNOUNCE"


def client(ns: Namespace) -> redis.Redis:
    return redis_client(ns.settings)


def partitions(ns: Namespace) -> list[int]:
    return list(range(ns.settings.topic_partitions))


def end_offsets(ns: Namespace) -> dict[int, int]:
    reader = Consumer({**kafka_config(ns.settings), "group.id": "probe"})
    try:
        topic = ns.settings.topic_clickstream
        return {
            p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions(ns)
        }
    finally:
        reader.close()


def kafka_committed(ns: Namespace) -> dict[int, int]:
    """The worker group's Kafka commits (partitions without one are left out)."""
    reader = Consumer({**kafka_config(ns.settings), "group.id": ns.group("streams")})
    try:
        tps = [TopicPartition(ns.settings.topic_clickstream, p) for p in partitions(ns)]
        return {
            tp.partition: tp.offset for tp in reader.committed(tps, timeout=10) if tp.offset >= 0
        }
    finally:
        reader.close()


def stored_offsets(ns: Namespace) -> dict[int, int]:
    """The offsets the fold stored in Redis, by partition of the test's clickstream topic."""
    r = client(ns)
    try:
        raw = r.hgetall(Keys(ns.settings.key_prefix).stream_offsets(ns.group("streams")))
    finally:
        r.close()
    topic = ns.settings.topic_clickstream
    out = {}
    for field, value in raw.items():
        name, _, partition = field.decode().rpartition(":")
        assert name == topic, field
        out[int(partition)] = int(value)
    return out


def pending(ns: Namespace) -> dict[str, bytes]:
    """Every pending change notice of the worker group, user -> stored value."""
    keys = Keys(ns.settings.key_prefix)
    r = client(ns)
    try:
        out: dict[str, bytes] = {}
        for p in partitions(ns):
            key = keys.pending_changes(ns.group("streams"), ns.settings.topic_clickstream, p)
            out.update({u.decode(): v for u, v in r.hgetall(key).items()})
        return out
    finally:
        r.close()


def caught_up(ns: Namespace) -> bool:
    """Redis holds the offset after every record produced, and no notice is pending."""
    ends = {p: e for p, e in end_offsets(ns).items() if e > 0}
    return stored_offsets(ns) == ends and not pending(ns)


def committed_everything(ns: Namespace) -> bool:
    ends = {p: e for p, e in end_offsets(ns).items() if e > 0}
    return kafka_committed(ns) == ends


def namespace_keys(r: redis.Redis, ns: Namespace) -> set[bytes]:
    return set(r.scan_iter(match=f"{ns.settings.key_prefix}*", count=1000))


def test_notice_decided_before_a_kill_is_announced_after_restart(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    catalog = load_test_catalog(ns.settings)
    users = ["k1", "k2", "k3", "k4"]
    events = traffic(users, 6)
    produce_events(ns.settings, events)
    # The worker kills itself right after the first fold that decides a change notice.
    doomed = workers(**{KILL_BEFORE_ANNOUNCE: "true"})
    assert doomed.proc is not None
    assert doomed.proc.wait(60) == -signal.SIGKILL, doomed.log_tail()
    decided = pending(ns)
    assert decided, "the fold must have recorded its notices before the kill"
    stored = profiles(ns.settings, decided)
    expected_versions: dict[str, int] = {}
    for user, value in decided.items():
        profile = stored[user]
        assert profile is not None
        expected_versions[user] = profile.version
        assert f"{user}" in value.decode()

    workers()

    def announced(records: list) -> bool:  # type: ignore[type-arg]  # Consumed, local use
        got = {
            (c.user_id, c.profile_version)
            for c in (ProfileChanged.model_validate_json(r.value) for r in records)
        }
        return set(expected_versions.items()) <= got

    consume(ns.settings.topic_profiles_changed, ns.settings, announced)
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 6), "all folded once")
    wait_for(lambda: caught_up(ns), "offsets stored, pending notices removed once delivered")
    assert_matches_reference(ns, events, catalog)
    # Recent popularity is counted in the fold: the killed batch's items once, by the fold that
    # committed before the kill, and not again by the restarted worker's.
    assert trend_counts(ns.settings, T0) == users_per_item(events)


def test_redis_rolled_back_is_refed_the_gap(ns: Namespace, workers: Callable[..., Worker]) -> None:
    catalog = load_test_catalog(ns.settings)
    users = [f"b{n}" for n in range(6)]
    first, second = traffic(users, 10), traffic(users, 10, start=10)
    produce_events(ns.settings, first)
    worker = workers(RECSTREAM_STREAMS_BATCH_SIZE="15")
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 10), "phase 1 folded")
    wait_for(lambda: caught_up(ns), "phase 1 offsets stored")

    # The state Redis will come back with.
    r = client(ns)
    try:
        older = snapshot(r, ns)
        produce_events(ns.settings, second)
        wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 20), "phase 2")
        wait_for(lambda: committed_everything(ns), "phase 2 committed to Kafka")
        assert worker.stop() == 0
        roll_back(r, ns, older)
    finally:
        r.close()
    assert counts(ns.settings, users) == dict.fromkeys(users, 10), "Redis is back at phase 1"
    assert committed_everything(ns), "while Kafka says everything was handled"

    workers(RECSTREAM_STREAMS_BATCH_SIZE="15")
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 20), "gap folded")
    wait_for(lambda: caught_up(ns), "offsets stored again")
    assert_matches_reference(ns, first + second, catalog)
    keys = Keys(ns.settings.key_prefix)
    r = client(ns)
    try:
        for user in users:
            assert r.zcard(keys.seen(user)) == 20, "each event folded exactly once"
    finally:
        r.close()


def snapshot(r: redis.Redis, ns: Namespace) -> dict[bytes, tuple[bytes, int]]:
    """Every key of the test's namespace, DUMPed with its TTL (what Redis could come back as)."""
    out = {}
    for key in namespace_keys(r, ns):
        dumped = r.dump(key)
        assert isinstance(dumped, bytes)
        out[key] = (dumped, r.pttl(key))
    return out


def roll_back(r: redis.Redis, ns: Namespace, to: dict[bytes, tuple[bytes, int]]) -> None:
    """Put the namespace back as ``to`` holds it: keys created since go, the others RESTOREd."""
    for key in namespace_keys(r, ns) - to.keys():
        r.delete(key)
    for key, (dumped, ttl_ms) in to.items():
        r.restore(key, max(ttl_ms, 0), dumped, replace=True)


def test_redis_rolled_back_under_a_running_worker_stops_it_and_the_next_refeeds(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    catalog = load_test_catalog(ns.settings)
    users = [f"w{n}" for n in range(4)]
    phases = [traffic(users, 8, start=8 * n) for n in range(3)]
    produce_events(ns.settings, phases[0])
    worker = workers(RECSTREAM_STREAMS_BATCH_SIZE="10")
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 8), "phase 1 folded")
    wait_for(lambda: caught_up(ns), "phase 1 offsets stored")
    r = client(ns)
    try:
        older = snapshot(r, ns)
        produce_events(ns.settings, phases[1])
        wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 16), "phase 2")
        wait_for(lambda: caught_up(ns), "phase 2 offsets stored")
        # Redis comes back older (an AOF that lost its last second) while the worker runs.
        roll_back(r, ns, older)
    finally:
        r.close()
    produce_events(ns.settings, phases[2])
    # Its next fold finds Redis behind what it stored: it stops without folding or committing
    # rather than fold on past a gap nobody would re-feed (`recstream run` restarts it). A
    # rebalance in between (a slow machine missing heartbeats) would instead resume it from
    # Redis's offsets at once, which re-feeds the gap just as well.
    _stops_or_refeeds(ns, worker, users, 24, lambda: workers(RECSTREAM_STREAMS_BATCH_SIZE="10"))
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 24), "all folded")
    wait_for(lambda: caught_up(ns), "offsets stored again")
    assert_matches_reference(ns, [e for phase in phases for e in phase], catalog)


def _stops_or_refeeds(
    ns: Namespace, worker: Worker, users: list[str], events: int, restart: Callable[[], object]
) -> None:
    """Wait until a worker that found Redis behind stops with status 70 (then ``restart`` it) or,
    after a rebalance, has re-fed the gap so every user holds ``events`` events."""
    proc = worker.proc
    assert proc is not None
    wait_for(
        lambda: (
            proc.poll() is not None or counts(ns.settings, users) == dict.fromkeys(users, events)
        ),
        "the worker stops, or re-feeds the gap after a rebalance",
        60,
    )
    if proc.poll() is not None:
        assert proc.returncode == 70, worker.log_tail()
        assert "Redis lost progress" in worker.log_tail()
        restart()


def test_redis_rolled_back_after_the_last_record_stops_the_worker_without_traffic(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    catalog = load_test_catalog(ns.settings)
    users = [f"q{n}" for n in range(3)]
    first, second = traffic(users, 6), traffic(users, 6, start=6)
    produce_events(ns.settings, first)
    fast_check = {"RECSTREAM_STREAMS_PROGRESS_CHECK_S": "0.5", "RECSTREAM_STREAMS_BATCH_SIZE": "8"}
    worker = workers(**fast_check)
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 6), "phase 1 folded")
    wait_for(lambda: caught_up(ns), "phase 1 offsets stored")
    r = client(ns)
    try:
        older = snapshot(r, ns)
        produce_events(ns.settings, second)
        wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 12), "phase 2")
        wait_for(lambda: caught_up(ns), "phase 2 offsets stored")
        roll_back(r, ns, older)  # and no record comes after: no fold will look at the offsets
    finally:
        r.close()
    # The periodic check finds Redis behind (or a rebalance re-reads it: the gap is re-fed).
    _stops_or_refeeds(ns, worker, users, 12, lambda: workers(**fast_check))
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 12), "gap folded")
    wait_for(lambda: caught_up(ns), "offsets stored again")
    assert_matches_reference(ns, first + second, catalog)


def test_fold_script_progress_is_monotonic_held_and_checked(ns: Namespace) -> None:
    """The script's own bookkeeping: offsets only move forward, a refused user holds its
    partition's offset at its first record, notices are kept for users that changed, a stale
    expectation fails the fold before any write, and a delivered notice is forgotten only while
    it is still the pending one."""
    keys = Keys(ns.settings.key_prefix)
    offsets_key = keys.stream_offsets("g")
    pend = keys.pending_changes("g", "t", 0)

    def progress(offsets: list[tuple[str, int, int]], users: list[str]) -> Progress:
        return Progress(offsets_key, offsets, {u: (pend, "t:0", 100, 123) for u in users})

    async def scenario() -> None:
        r = async_redis_client(ns.settings)
        script = FoldScript(r, ns.settings.key_prefix, FoldParams())
        try:
            batch = {"u1": [("e1", "a", 1_700_000_000.0, 1.0)]}
            (first,) = await script.run(batch, progress([("t:0", 110, -1)], ["u1"]))
            assert first.emit and await r.hget(offsets_key, "t:0") == b"110"
            stored = await r.hget(pend, "u1")
            assert stored is not None
            assert pending_notice(stored) == (123, first)
            # A later fold of an older position (another worker's stale batch) does not move it
            # back; a duplicate decides no notice, so the pending one stays as it was.
            (again,) = await script.run(batch, progress([("t:0", 105, -1)], ["u1"]))
            assert again.duplicates == 1 and not again.emit
            assert await r.hget(offsets_key, "t:0") == b"110"
            assert await r.hget(pend, "u1") == stored
            # A user whose keys hold a wrong type is refused: the offset stops at its first record.
            await r.set(keys.profile("bad"), "not a hash")
            both = {**batch, "bad": [("e2", "b", 1_700_000_000.0, 1.0)]}
            await r.hset(offsets_key, "t:0", 90)
            results = await script.run(both, progress([("t:0", 130, 90)], ["u1", "bad"]))
            assert [x.rejected for x in results] == ["", "WRONGTYPE"]
            assert await r.hget(offsets_key, "t:0") == b"100", "held at the refused user's record"
            assert await r.hget(pend, "bad") is None
            # Redis holding less than the worker knows: the fold fails and writes nothing.
            with pytest.raises(redis.exceptions.ResponseError, match=PROGRESS_LOST):
                await script.run(
                    {"u1": [("e9", "c", 1_700_000_100.0, 1.0)]},
                    progress([("t:0", 200, 150)], ["u1"]),
                )
            assert await r.zscore(keys.seen("u1"), "e9") is None
            # A batch whose records were all dead-lettered folds no user, yet stores its offsets:
            # the worker counts them as Redis's progress from then on.
            assert await script.run({}, progress([("t:0", 140, 100)], [])) == []
            assert await r.hget(offsets_key, "t:0") == b"140"
            # Forgetting a delivered notice: only the version that was delivered.
            forget = r.register_script(FORGET_DELIVERED_LUA)
            assert await forget(args=[orjson.dumps([[pend, "u1", first.version + 1]])]) == 0
            assert await forget(args=[orjson.dumps([[pend, "u1", first.version]])]) == 1
            assert await r.hget(pend, "u1") is None
        finally:
            await r.aclose()

    asyncio.run(scenario())


def test_redis_emptied_is_refed_from_the_earliest_offset(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    load_test_catalog(ns.settings)
    users = [f"e{n}" for n in range(5)]
    events = traffic(users, 12)
    produce_events(ns.settings, events)
    worker = workers()
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 12), "folded")
    wait_for(lambda: committed_everything(ns), "committed to Kafka")
    assert worker.stop() == 0

    r = client(ns)
    try:
        for key in namespace_keys(r, ns):
            r.delete(key)
    finally:
        r.close()
    # The operator restores the catalog (a separate, reloadable data set); profiles, offsets and
    # seen-sets are gone while Kafka's commits say everything was handled.
    catalog = load_test_catalog(ns.settings)
    assert counts(ns.settings, users) == dict.fromkeys(users, 0)

    workers()
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 12), "re-fed")
    wait_for(lambda: caught_up(ns), "offsets stored again")
    assert_matches_reference(ns, events, catalog)
