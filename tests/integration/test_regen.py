"""Regeneration and cache writing on the real Kafka and Redis, end to end.

The worker pool serves the co-occurrence model fitted on ML-100K; each test compares what reaches
the output topic and the cache with what that same model returns for the user's final profile.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from consumers.cache_writer import CacheWriter, CasOutcome, RecsCache
from consumers.regen import RegenService, build_pool
from consumers.settings import CacheWriterSettings, RegenSettings
from inference.artifact import ArtifactRecommender, load_recommender
from inference.pool import WorkerPool
from lab.datasets import Dataset, load_dataset
from ops.catalog import load_catalog
from ops.feed import produce, replay_records
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.security import async_redis_client, kafka_config, redis_client
from recstream.settings import CommonSettings
from schemas import ModelRef, ProfileChanged, ProfileChanges, Recommendations, ScoredItem
from streams.fold import FoldParams, FoldScript
from streams.profile import read_profile
from tests.conftest import Namespace

pytestmark = pytest.mark.integration

K = 10
ENDS = ("folded", "duplicate", "dead_lettered")


@pytest.fixture(scope="module")
def dataset(stack_ready: CommonSettings) -> Dataset:
    return load_dataset("ml-100k", stack_ready.data_dir)


@pytest.fixture(scope="module")
def pool(stack_ready: CommonSettings, hybrid_artifact: Path) -> Iterator[WorkerPool]:
    settings = RegenSettings(
        **stack_ready.model_dump(),
        regen_model_dir=hybrid_artifact,
        regen_pool={"workers": 1, "request_timeout_s": 10.0},
    )
    started = build_pool(settings).start()
    yield started
    started.close()


@pytest.fixture(scope="module")
def model(hybrid_artifact: Path) -> ArtifactRecommender:
    """The same artifact the pool serves (gen+ease, so its lists have reasons), loaded here to
    compute the expected answers."""
    return load_recommender(hybrid_artifact)


@dataclass
class Services:
    regen: RegenService
    writer: CacheWriter
    redis: redis.Redis
    keys: Keys


@pytest.fixture
def services(ns: Namespace, pool: WorkerPool) -> Iterator[Services]:
    common = ns.settings.model_dump()
    regen = RegenService(
        RegenSettings(**common, regen_group_id=ns.group("regen"), regen_debounce_ms=20.0), pool
    )
    writer = CacheWriter(CacheWriterSettings(**common, cache_group_id=ns.group("cache")))
    threads = [
        threading.Thread(target=svc.run, name=name, daemon=True)
        for name, svc in (("regen", regen), ("cache", writer))
    ]
    for thread in threads:
        thread.start()
    client = redis_client(ns.settings)
    try:
        yield Services(regen, writer, client, Keys(ns.settings.key_prefix))
    finally:
        regen.stop()
        writer.stop()
        for thread in threads:
            thread.join(30)
        client.close()


def _cached(svc: Services, user: str) -> Recommendations | None:
    raw = svc.redis.get(svc.keys.recs(user))
    return None if raw is None else Recommendations.model_validate_json(raw)


def _read_topic(settings: CommonSettings, group: str) -> list[Recommendations]:
    """Everything on the output topic, in partition order (readiness: high watermarks)."""
    consumer = Consumer(
        {
            **kafka_config(settings),
            "group.id": group,
            "enable.auto.commit": False,
        }
    )
    topic = settings.topic_recommendations
    try:
        out: list[Recommendations] = []
        for partition in range(settings.topic_partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            taken = 0
            while taken < high - low:
                message = consumer.poll(5)
                assert message is not None, "output topic did not deliver to its watermark"
                assert message.error() is None
                out.append(Recommendations.model_validate_json(message.value() or b""))
                taken += 1
        return out
    finally:
        consumer.close()


def _wait_for(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _expected(
    model: ArtifactRecommender, svc: Services, user: str
) -> tuple[int, list[str], dict[str, list[str]]]:
    """The user's profile version, the model's list for it and each item's reasons."""
    profile = read_profile(svc.redis, svc.keys, user)
    assert profile is not None
    history = list(reversed(profile.recent_items))
    items = [item for item, _ in model.recommend([history], K)[0]]
    return profile.version, items, model.explain(history, items)


def test_replayed_slice_gets_fresh_model_lists_on_the_topic_and_in_the_cache(
    ns: Namespace,
    services: Services,
    dataset: Dataset,
    model: ArtifactRecommender,
    tmp_path: Path,
) -> None:
    settings = ns.settings
    load_catalog(services.redis, services.keys, dataset)
    env = {
        **os.environ,
        "RECSTREAM_KEY_PREFIX": settings.key_prefix,
        "RECSTREAM_TOPIC_CLICKSTREAM": settings.topic_clickstream,
        "RECSTREAM_TOPIC_DLQ": settings.topic_dlq,
        "RECSTREAM_TOPIC_PROFILES_CHANGED": settings.topic_profiles_changed,
        "RECSTREAM_TOPIC_RECOMMENDATIONS": settings.topic_recommendations,
        "RECSTREAM_STREAMS_APP_ID": ns.group("streams"),
        "RECSTREAM_STREAMS_DATADIR": str(tmp_path),
        "RECSTREAM_STREAMS_LOGLEVEL": "warning",
    }
    with (tmp_path / "streams.log").open("wb") as log_file:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "streams"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    try:
        # The first 1,000 ratings as their opening views: each view brings a new item, so every
        # fold is a meaningful change and each user's final profile version is announced. (A
        # click or dwell on a known item can bump the version silently, by design.)
        records = [
            (key, value)
            for key, value in replay_records(dataset, 3000)
            if orjson.loads(value)["type"] == "view"
        ]
        events: dict[str, int] = {}
        for key, _ in records:
            events[key.decode()] = events.get(key.decode(), 0) + 1
        produce(settings, settings.topic_clickstream, iter(records))

        def folded() -> bool:
            for user, count in events.items():
                profile = read_profile(services.redis, services.keys, user)
                if profile is None or profile.event_count != count:
                    return False
            return True

        _wait_for(folded, 45, "the Faust worker to fold the slice")
        expected = {user: _expected(model, services, user) for user in events}

        def cached() -> bool:
            for user, (version, _, _) in expected.items():
                recs = _cached(services, user)
                if recs is None or recs.profile_version != version:
                    return False
            return True

        _wait_for(cached, 30, "fresh lists in the cache for every changed user")
    finally:
        worker.terminate()
        worker.wait(30)

    catalog = set(dataset.items)
    published = _read_topic(settings, ns.group("reader"))
    assert {r.user_id for r in published} == set(events)
    newest: dict[str, Recommendations] = {}
    for recs in published:
        previous = newest.get(recs.user_id)
        assert previous is None or previous.profile_version <= recs.profile_version
        newest[recs.user_id] = recs
        assert {i.item_id for i in recs.items} <= catalog
    explained = 0
    for user, (version, items, because) in expected.items():
        cached_recs = _cached(services, user)
        assert cached_recs is not None
        assert cached_recs == newest[user]  # the cache holds the newest published list
        assert cached_recs.profile_version == version
        assert cached_recs.source == "model"
        assert [i.item_id for i in cached_recs.items] == items
        # Each item's reasons are the model's, named with the catalog's titles.
        for item in cached_recs.items:
            assert [r.item_id for r in item.because] == because[item.item_id]
            assert [r.title for r in item.because] == [
                dataset.items[r.item_id].title for r in item.because
            ]
            explained += bool(item.because)
    assert explained > len(expected)  # most lists explain most items
    assert len(published) < sum(events.values())  # far fewer lists than events


def _fold_one_by_one(
    settings: CommonSettings, user: str, items: list[str], start: datetime
) -> list[tuple[int, datetime]]:
    """Fold one click per item straight into Redis; returns (profile version, event time)."""

    async def run() -> list[tuple[int, datetime]]:
        client = async_redis_client(settings)
        script = FoldScript(client, settings.key_prefix, FoldParams())
        out = []
        try:
            for n, item in enumerate(items):
                ts = start + timedelta(seconds=n)
                (result,) = await script.run({user: [(f"e-{user}-{n}", item, ts.timestamp(), 2.0)]})
                out.append((result.version, ts))
        finally:
            await client.aclose()
        return out

    return asyncio.run(run())


def test_a_burst_of_fifty_changes_regenerates_far_fewer_times_on_the_last_profile(
    ns: Namespace, services: Services, dataset: Dataset, model: ArtifactRecommender
) -> None:
    settings = ns.settings
    user = "burst-user"
    items = list(dataset.items)[:50]
    versions = _fold_one_by_one(settings, user, items, datetime(2026, 1, 1, tzinfo=UTC))
    producer = idempotent_producer(settings)
    # A poison message in the same partition must not hold its offset back.
    producer.produce(settings.topic_profiles_changed, key=user.encode(), value=b"{not json")
    for n, (version, ts) in enumerate(versions):
        change = ProfileChanged(
            user_id=user,
            profile_version=version,
            changes=ProfileChanges(new_items=[items[n]], events=1),
            event_id=f"e-{user}-{n}",
            trigger_ts=ts,
        )
        producer.produce(
            settings.topic_profiles_changed, key=user.encode(), value=change.model_dump_json()
        )
    assert producer.flush(10) == 0
    final_version, final_ts = versions[-1]
    _wait_for(
        lambda: (r := _cached(services, user)) is not None and r.profile_version == final_version,
        30,
        "the burst's final list in the cache",
    )
    published = [r for r in _read_topic(settings, ns.group("reader")) if r.user_id == user]
    assert 1 <= len(published) <= 10  # 50 changes, a handful of regenerations at most
    last = published[-1]
    assert last.profile_version == final_version
    assert last.trigger_ts == final_ts  # reflects the last event
    assert [i.item_id for i in last.items] == _expected(model, services, user)[1]

    # Every change ended in one outcome: one list folded, the burst's others coalesced into it
    # (duplicate), the poison message dead-lettered.
    topic = settings.topic_profiles_changed

    def outcome(name: str) -> float:
        labels = {"service": "regen", "topic": topic, "outcome": name}
        return REGISTRY.get_sample_value("recs_records_total", labels) or 0.0

    _wait_for(lambda: outcome("in") == 51 == sum(outcome(o) for o in ENDS), 30, "every outcome")
    assert (outcome("folded"), outcome("dead_lettered")) == (len(published), 1)

    # Every change is accounted for: once the consumer stops, its group has committed them all.
    services.regen.stop()
    _wait_for(lambda: not services.regen.running.is_set(), 30, "the consumer to close")
    probe = Consumer({**kafka_config(settings), "group.id": ns.group("regen")})
    try:
        partitions = [
            TopicPartition(settings.topic_profiles_changed, p)
            for p in range(settings.topic_partitions)
        ]
        committed = {tp.partition: tp.offset for tp in probe.committed(partitions, timeout=10)}
        for tp in partitions:
            low, high = probe.get_watermark_offsets(tp, timeout=10)
            if high > low:
                assert committed[tp.partition] == high
    finally:
        probe.close()


def _recs(user: str, version: int) -> Recommendations:
    now = datetime.now(UTC)
    return Recommendations(
        user_id=user,
        items=[ScoredItem(item_id=f"item-{version}", score=1.0)],
        profile_version=version,
        model=ModelRef(name="test", version="1"),
        variant="default",
        source="model",
        generated_at=now,
        trigger_ts=now,
    )


def test_cache_compare_and_set_never_goes_backwards(ns: Namespace) -> None:
    client = redis_client(ns.settings)
    keys = Keys(ns.settings.key_prefix)
    cache = RecsCache(client, keys, ttl_s=60)
    written, stale = CasOutcome.WRITTEN, CasOutcome.STALE
    try:
        assert cache.write_many([("u", 1, _recs("u", 1).model_dump_json().encode())]) == [
            CasOutcome.NO_PROFILE
        ]
        # The CAS reads only the profile's version (the fold's field), so a test may set it.
        client.hset(keys.profile("u"), "version", 8)
        batch = [("u", v, _recs("u", v).model_dump_json().encode()) for v in (3, 7, 5, 7)]
        assert cache.write_many(batch) == [written, written, stale, written]
        stored = Recommendations.model_validate_json(client.get(keys.recs("u")) or b"")
        assert stored.profile_version == 7
        assert 0 < client.pttl(keys.recs("u")) <= 60_000
        assert cache.write_many([("u", 6, _recs("u", 6).model_dump_json().encode())]) == [stale]
        assert cache.write_many([("u", 8, _recs("u", 8).model_dump_json().encode())]) == [written]
        stored = Recommendations.model_validate_json(client.get(keys.recs("u")) or b"")
        assert stored.items[0].item_id == "item-8"
        # Ahead of the stored profile: refused, and the cached list stays.
        forged = _recs("u", 10**15).model_dump_json().encode()
        assert cache.write_many([("u", 10**15, forged)]) == [CasOutcome.VERSION_AHEAD]
        stored = Recommendations.model_validate_json(client.get(keys.recs("u")) or b"")
        assert stored.profile_version == 8
    finally:
        client.close()


def test_cache_writer_batches_and_moves_past_invalid_messages(ns: Namespace) -> None:
    from consumers.metrics import CACHE_BATCH_SIZE, CACHE_INVALID

    settings = ns.settings
    producer = idempotent_producer(settings)
    users = [f"u{n}" for n in range(100)]
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    for user in users:
        client.hset(keys.profile(user), "version", 2)  # the CAS reads only this field
    for user in users:
        for version in (1, 2):
            value = _recs(user, version).model_dump_json()
            producer.produce(settings.topic_recommendations, key=user.encode(), value=value)
    producer.produce(settings.topic_recommendations, key=b"bad", value=b"{not json")
    assert producer.flush(10) == 0

    def batches() -> float:
        samples = next(iter(CACHE_BATCH_SIZE.collect())).samples
        return next(s.value for s in samples if s.name.endswith("_count"))

    invalid_before = CACHE_INVALID._value.get()
    batches_before = batches()
    writer = CacheWriter(
        CacheWriterSettings(**settings.model_dump(), cache_group_id=ns.group("cache"))
    )
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    try:
        _wait_for(
            lambda: writer.written + writer.stale + writer.dead_lettered >= 201,
            30,
            "every list written and the bad one dead-lettered",
        )
    finally:
        writer.stop()
        thread.join(30)
    try:
        for user in users:
            stored = Recommendations.model_validate_json(client.get(keys.recs(user)) or b"")
            assert stored.profile_version == 2
    finally:
        client.close()
    assert CACHE_INVALID._value.get() - invalid_before == 1
    assert batches() - batches_before < 200  # several lists per round trip


def test_a_saturated_pool_pauses_input_and_loses_nothing(ns: Namespace) -> None:
    """A slow model behind a two-slot queue: partitions pause, and every user is still served."""
    import functools

    from inference.pool import PoolConfig
    from inference.popularity import Popularity
    from tests.unit.pool_models import CATALOG, expected, make_echo

    settings = ns.settings
    users = [f"slow-{n}" for n in range(30)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    folds = {
        u: _fold_one_by_one(settings, u, [CATALOG[n % 40]], start)[0] for n, u in enumerate(users)
    }
    producer = idempotent_producer(settings)
    for user, (version, ts) in folds.items():
        change = ProfileChanged(
            user_id=user,
            profile_version=version,
            changes=ProfileChanges(events=1),
            event_id=f"e-{user}",
            trigger_ts=ts,
        )
        producer.produce(
            settings.topic_profiles_changed, key=user.encode(), value=change.model_dump_json()
        )
    assert producer.flush(10) == 0

    config = PoolConfig(workers=1, max_batch_size=1, queue_size=2, request_timeout_s=30)
    fallback = Popularity({item: 1 for item in CATALOG})
    slow = WorkerPool(functools.partial(make_echo, delay_s=0.03), fallback, CATALOG, config)
    slow.start()
    common = settings.model_dump()
    regen = RegenService(
        RegenSettings(**common, regen_group_id=ns.group("regen"), regen_debounce_ms=0.0), slow
    )
    writer = CacheWriter(CacheWriterSettings(**common, cache_group_id=ns.group("cache")))
    threads = [threading.Thread(target=svc.run, daemon=True) for svc in (regen, writer)]
    for thread in threads:
        thread.start()
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    try:

        def all_cached() -> bool:
            return all(client.exists(keys.recs(u)) for u in users)

        _wait_for(all_cached, 30, "a list for every user")
    finally:
        regen.stop()
        writer.stop()
        for thread in threads:
            thread.join(30)
        slow.close()
    assert regen.pauses >= 1
    for n, user in enumerate(users):
        recs = Recommendations.model_validate_json(client.get(keys.recs(user)) or b"")
        assert recs.source == "model"
        assert [(i.item_id, i.score) for i in recs.items] == expected([CATALOG[n % 40]], K)
    client.close()
