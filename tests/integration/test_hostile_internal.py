"""Hostile and broken records on the internal topics, and the faults the consumers must survive.

``profiles.changed`` and ``recommendations`` are written by our own services, but anything that
can produce to the cluster can write them too. Every record must end folded, duplicate or
dead-lettered (with its original key and bytes and a reason), never crash or stall a consumer,
and never change another user's cached list. A forged ``profile_version`` must not lock the
cache. Faults (a broker that refuses the output, a Redis outage) end in a bounded retry and a
non-zero exit, never in work acknowledged and lost.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource
from prometheus_client import REGISTRY

from cli.supervise import free_port
from consumers.cache_writer import CacheWriter
from consumers.deadletter import DeadReason
from consumers.exceptions import CacheWriteError, DeliveryError
from consumers.metrics import BAD_HEADERS, ORIGIN_HEADER
from consumers.regen import RegenService
from consumers.settings import CacheWriterSettings, RegenSettings
from inference.pool import PoolConfig, WorkerPool
from inference.popularity import Popularity
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.security import kafka_config, redis_client
from recstream.settings import CommonSettings
from schemas import ModelRef, ProfileChanged, ProfileChanges, Recommendations, ScoredItem
from schemas.deadletter import HEADER_REASON, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION
from tests.conftest import Namespace
from tests.integration.redis_support import start_redis
from tests.integration.test_regen import _fold_one_by_one, _wait_for
from tests.unit.pool_models import CATALOG, make_echo

pytestmark = pytest.mark.integration

START = datetime(2026, 1, 1, tzinfo=UTC)
LIMIT = 4096  # max message bytes of both consumers here: an oversize record is cheap to make
HOSTILE_ORIGINS = [b"9" * 400, b"soon", b"-1700000000000"]


@pytest.fixture(scope="module")
def echo_pool(stack_ready: CommonSettings) -> Iterator[WorkerPool]:
    fallback = Popularity({item: 1 for item in CATALOG})
    pool = WorkerPool(make_echo, fallback, CATALOG, PoolConfig(workers=1)).start()
    yield pool
    pool.close()


@dataclass
class Running:
    """Services on their own threads; ``errors`` holds what ``run`` raised, by name."""

    threads: dict[str, threading.Thread] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def start(self, name: str, run: Callable[[], None]) -> None:
        def target() -> None:
            try:
                run()
            except BaseException as exc:  # kept for the test to assert on
                self.errors[name] = exc

        thread = threading.Thread(target=target, name=name, daemon=True)
        self.threads[name] = thread
        thread.start()

    def alive(self, name: str) -> bool:
        return self.threads[name].is_alive() and name not in self.errors


def _regen(ns: Namespace, pool: WorkerPool, **overrides: Any) -> RegenService:
    settings = RegenSettings(
        **ns.settings.model_dump(),
        regen_group_id=ns.group("regen"),
        regen_debounce_ms=0.0,
        regen_max_message_bytes=LIMIT,
        **overrides,
    )
    return RegenService(settings, pool)


def _writer(ns: Namespace, **overrides: Any) -> CacheWriter:
    settings = CacheWriterSettings(
        **{**ns.settings.model_dump(), **overrides.pop("common", {})},
        cache_group_id=ns.group("cache"),
        cache_max_message_bytes=LIMIT,
        **overrides,
    )
    return CacheWriter(settings)


def _change(user: str, version: int, **extra: Any) -> bytes:
    change = ProfileChanged(
        user_id=user,
        profile_version=version,
        changes=ProfileChanges(events=1),
        event_id=f"e-{user}-{version}",
        trigger_ts=START,
    )
    return _with(change.model_dump_json().encode(), **extra)


def _recs(user: str, version: int, **extra: Any) -> bytes:
    recs = Recommendations(
        user_id=user,
        items=[ScoredItem(item_id=CATALOG[version % len(CATALOG)], score=1.0)],
        profile_version=version,
        model=ModelRef(name="forger", version="1"),
        variant="default",
        source="model",
        generated_at=datetime.now(UTC),
        trigger_ts=datetime.now(UTC),
    )
    return _with(recs.model_dump_json().encode(), **extra)


def _with(payload: bytes, **extra: Any) -> bytes:
    """``payload`` with fields replaced, added (a value) or removed (``None``), as raw JSON."""
    import orjson

    body = orjson.loads(payload)
    for name, value in extra.items():
        if value is None:
            body.pop(name)
        else:
            body[name] = value
    return orjson.dumps(body)


@dataclass(frozen=True)
class Hostile:
    kind: str
    key: bytes | None
    value: bytes | None
    reason: DeadReason


def _hostile_kinds(make: Callable[..., bytes], victim: str, stored: int) -> list[Hostile]:
    """The same 14 kinds of broken or forged record for either internal topic."""
    good = make(victim, stored)
    return [
        Hostile("bad JSON", victim.encode(), b'{"user_id": "victim",', DeadReason.BAD_JSON),
        Hostile("bad UTF-8", victim.encode(), b'{"user_id": "\xff\xfe"}', DeadReason.BAD_UTF8),
        Hostile("tombstone", victim.encode(), None, DeadReason.TOMBSTONE),
        Hostile("JSON array", victim.encode(), b"[" + good + b"]", DeadReason.NOT_AN_OBJECT),
        Hostile(
            "missing field",
            victim.encode(),
            make(victim, stored, trigger_ts=None),
            DeadReason.MISSING_FIELD,
        ),
        Hostile(
            "extra field",
            victim.encode(),
            make(victim, stored, admin=True),
            DeadReason.EXTRA_FIELD,
        ),
        Hostile(
            "schema_version 2",
            victim.encode(),
            make(victim, stored, schema_version=2),
            DeadReason.SCHEMA_VERSION,
        ),
        Hostile("key is not user_id", b"mallory", good, DeadReason.KEY_MISMATCH),
        Hostile(
            "control character in id",
            b"victim\x07",
            make(victim, stored, user_id="victim\x07"),
            DeadReason.BAD_ID,
        ),
        Hostile(
            "65-character id", b"v" * 65, make(victim, stored, user_id="v" * 65), DeadReason.BAD_ID
        ),
        # Under the old key layout this user's keys overlapped the victim's; now it is just a
        # user without a profile.
        Hostile(
            "colliding id",
            f"{victim}:recs".encode(),
            make(victim, stored, user_id=f"{victim}:recs"),
            DeadReason.NO_PROFILE,
        ),
        Hostile(
            "forged version 10^15",
            victim.encode(),
            make(victim, stored, profile_version=10**15),
            DeadReason.VERSION_AHEAD,
        ),
        Hostile(
            "version ahead of the stored profile",
            victim.encode(),
            make(victim, stored, profile_version=stored + 1),
            DeadReason.VERSION_AHEAD,
        ),
        Hostile(
            "oversize",
            victim.encode(),
            make(victim, stored, padding="x" * LIMIT),
            DeadReason.OVERSIZE,
        ),
    ]


def _produce(
    settings: CommonSettings,
    topic: str,
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]],
) -> list[tuple[int, int]]:
    """Produce in order and return each record's (partition, offset)."""
    producer = idempotent_producer(settings)
    where: list[tuple[int, int]] = [(-1, -1)] * len(records)

    def delivered(n: int, err: Any, msg: Message) -> None:
        assert err is None, err
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None and offset is not None
        where[n] = (partition, offset)

    for n, (key, value, headers) in enumerate(records):
        producer.produce(
            topic,
            key=key,
            value=value,
            headers=headers,
            on_delivery=functools.partial(delivered, n),
        )
    assert producer.flush(10) == 0
    return where


def _read_all(settings: CommonSettings, topic: str) -> list[Message]:
    """Every record of ``topic`` up to its high watermarks."""
    consumer = Consumer(
        {
            **kafka_config(settings),
            "group.id": "unused",
            "enable.auto.commit": False,
        }
    )
    out: list[Message] = []
    try:
        for partition in range(settings.topic_partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), 10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, partition, low)])
            while len([m for m in out if m.partition() == partition]) < high - low:
                message = consumer.poll(5)
                assert message is not None, f"{topic} did not deliver to its watermark"
                assert message.error() is None
                out.append(message)
        return out
    finally:
        consumer.close()


def _records(service: str, topic: str, outcome: str) -> float:
    labels = {"service": service, "topic": topic, "outcome": outcome}
    return REGISTRY.get_sample_value("recs_records_total", labels) or 0.0


def _balanced(service: str, topic: str, expected_in: int) -> bool:
    """``in = folded + duplicate + dead_lettered``, once all ``expected_in`` records are read."""
    ended = sum(_records(service, topic, o) for o in ("folded", "duplicate", "dead_lettered"))
    return _records(service, topic, "in") == expected_in == ended


def _assert_dead_letters(
    settings: CommonSettings,
    dlq: str,
    hostile: list[Hostile],
    where: list[tuple[int, int]],
) -> None:
    by_source: dict[tuple[int, int], Message] = {}
    for message in _read_all(settings, dlq):
        headers = dict(message.headers() or [])
        source = (int(headers[HEADER_SOURCE_PARTITION]), int(headers[HEADER_SOURCE_OFFSET]))
        by_source[source] = message
    assert len(by_source) == len(hostile)
    for kind, position in zip(hostile, where, strict=True):
        letter = by_source[position]
        headers = dict(letter.headers() or [])
        assert headers[HEADER_REASON] == kind.reason.encode(), kind.kind
        assert (letter.key(), letter.value()) == (kind.key, kind.value), kind.kind


def test_hostile_changes_are_dead_lettered_and_never_touch_the_victim(
    ns: Namespace, echo_pool: WorkerPool
) -> None:
    settings = ns.settings
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    versions = {
        user: _fold_one_by_one(settings, user, [CATALOG[n]], START)[0][0]
        for n, user in enumerate(("victim", "hdr", "good"))
    }
    regen, writer = _regen(ns, echo_pool), _writer(ns)
    running = Running()
    running.start("regen", regen.run)
    running.start("cache", writer.run)
    topic = settings.topic_profiles_changed
    headers_before = BAD_HEADERS.labels("regen", ORIGIN_HEADER)._value.get()
    try:
        _produce(
            settings,
            topic,
            [(b"victim", _change("victim", versions["victim"]), None)],
        )
        _wait_for(lambda: client.exists(keys.recs("victim")), 30, "the victim's real list")
        before = client.get(keys.recs("victim"))

        hostile = _hostile_kinds(_change, "victim", versions["victim"])
        where = _produce(settings, topic, [(h.key, h.value, None) for h in hostile])
        # Header-only hostility: good changes whose origin header is garbage are processed.
        _produce(
            settings,
            topic,
            [
                (b"hdr", _change("hdr", versions["hdr"]), [(ORIGIN_HEADER, raw)])
                for raw in HOSTILE_ORIGINS
            ]
            + [(b"good", _change("good", versions["good"]), None)],
        )
        total = 1 + len(hostile) + len(HOSTILE_ORIGINS) + 1
        _wait_for(lambda: _balanced("regen", topic, total), 30, "every change to end")
        _wait_for(
            lambda: client.exists(keys.recs("hdr")) and client.exists(keys.recs("good")),
            30,
            "lists after the hostile records",
        )
        assert running.alive("regen") and running.alive("cache")
        assert regen.health()[0]
        assert _records("regen", topic, "dead_lettered") == len(hostile)
        assert BAD_HEADERS.labels("regen", ORIGIN_HEADER)._value.get() - headers_before == 3
        _assert_dead_letters(settings, settings.topic_profiles_changed_dlq, hostile, where)
        assert client.get(keys.recs("victim")) == before  # no forged version reached the cache
        for user in ("hdr", "good"):
            cached = Recommendations.model_validate_json(client.get(keys.recs(user)) or b"")
            assert cached.profile_version == versions[user]
    finally:
        regen.stop()
        writer.stop()
        for thread in running.threads.values():
            thread.join(30)
        client.close()
    assert not running.errors


def test_hostile_lists_are_dead_lettered_and_never_touch_the_victim(
    ns: Namespace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = ns.settings
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    versions = {
        user: _fold_one_by_one(settings, user, [CATALOG[n]], START)[0][0]
        for n, user in enumerate(("victim", "hdr", "good"))
    }
    writer = _writer(ns)
    running = Running()
    running.start("cache", writer.run)
    topic = settings.topic_recommendations
    headers_before = BAD_HEADERS.labels("cache_writer", ORIGIN_HEADER)._value.get()
    try:
        real = _recs("victim", versions["victim"])
        _produce(settings, topic, [(b"victim", real, None)])
        _wait_for(lambda: client.get(keys.recs("victim")) == real, 30, "the victim's real list")

        hostile = _hostile_kinds(_recs, "victim", versions["victim"])
        where = _produce(settings, topic, [(h.key, h.value, None) for h in hostile])
        hdr, good = _recs("hdr", versions["hdr"]), _recs("good", versions["good"])
        _produce(
            settings,
            topic,
            [(b"hdr", hdr, [(ORIGIN_HEADER, raw)]) for raw in HOSTILE_ORIGINS]
            + [(b"good", good, None)],
        )
        total = 1 + len(hostile) + len(HOSTILE_ORIGINS) + 1
        _wait_for(lambda: _balanced("cache_writer", topic, total), 30, "every list to end")
        assert running.alive("cache")
        assert writer.health()[0]
        assert _records("cache_writer", topic, "dead_lettered") == len(hostile)
        assert _records("cache_writer", topic, "folded") == 1 + len(HOSTILE_ORIGINS) + 1
        assert BAD_HEADERS.labels("cache_writer", ORIGIN_HEADER)._value.get() - headers_before == 3
        _assert_dead_letters(settings, settings.topic_recommendations_dlq, hostile, where)
        assert client.get(keys.recs("victim")) == real
        assert client.get(keys.recs("hdr")) == hdr and client.get(keys.recs("good")) == good
        # The real next list is still accepted: the forged 10^15 locked nothing.
        # (The first event is the one folded before, a duplicate; the second is new.)
        newer = _fold_one_by_one(settings, "victim", [CATALOG[0], CATALOG[9]], START)[-1][0]
        follow = _recs("victim", newer)
        _produce(settings, topic, [(b"victim", follow, None)])
        _wait_for(lambda: client.get(keys.recs("victim")) == follow, 30, "the next real list")
    finally:
        writer.stop()
        running.threads["cache"].join(30)
        client.close()
    assert not running.errors
    # Refusals are logged by position: no user id (personal data) reaches the logs.
    refusals = [r.getMessage() for r in caplog.records if "refused list" in r.getMessage()]
    assert refusals
    assert not any("victim" in message for message in refusals)


def _committed_all(settings: CommonSettings, group: str, topic: str) -> bool:
    """Whether ``group`` has committed every record of ``topic``."""
    probe = Consumer({**kafka_config(settings), "group.id": group})
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.topic_partitions)]
        committed = {tp.partition: tp.offset for tp in probe.committed(partitions, timeout=10)}
        for tp in partitions:
            low, high = probe.get_watermark_offsets(tp, timeout=10)
            if high > low and committed[tp.partition] != high:
                return False
        return True
    finally:
        probe.close()


def _set_topic_config(settings: CommonSettings, topic: str, name: str, value: str) -> None:
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ResourceType

    admin = AdminClient(kafka_config(settings))
    entry = ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def test_a_refused_publication_is_retried_then_the_service_exits_and_a_restart_redoes_it(
    ns: Namespace, echo_pool: WorkerPool
) -> None:
    settings = ns.settings
    out = settings.topic_recommendations
    # The broker now refuses every list (MSG_SIZE_TOO_LARGE): each delivery attempt fails.
    _set_topic_config(settings, out, "max.message.bytes", "64")
    version = _fold_one_by_one(settings, "u", [CATALOG[3]], START)[0][0]
    _produce(
        settings,
        settings.topic_profiles_changed,
        [(b"u", _change("u", version), None)],
    )
    fast = {"regen_delivery_attempts": 3, "regen_retry_backoff_s": 0.05}
    regen = _regen(ns, echo_pool, **fast)
    running = Running()
    running.start("regen", regen.run)
    running.threads["regen"].join(60)
    assert isinstance(running.errors.get("regen"), DeliveryError)  # exits instead of stalling
    assert not _committed_all(settings, ns.group("regen"), settings.topic_profiles_changed)

    # The broker takes lists again: the restarted service redoes the unfinished change.
    _set_topic_config(settings, out, "max.message.bytes", "1048588")
    regen, writer = _regen(ns, echo_pool, **fast), _writer(ns)
    again = Running()
    again.start("regen", regen.run)
    again.start("cache", writer.run)
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    try:
        _wait_for(lambda: client.exists(keys.recs("u")), 30, "the list after the restart")
    finally:
        regen.stop()
        writer.stop()
        for thread in again.threads.values():
            thread.join(30)
        client.close()
    assert not again.errors
    assert _committed_all(settings, ns.group("regen"), settings.topic_profiles_changed)


def test_a_redis_outage_is_retried_and_past_the_budget_the_writer_exits_unacked(
    ns: Namespace, tmp_path: Path
) -> None:
    from consumers.metrics import CACHE_REDIS_ERRORS

    settings = ns.settings
    port = free_port()
    server = start_redis(port, tmp_path)
    client = redis.Redis(port=port)
    keys = Keys(settings.key_prefix)
    client.hset(keys.profile("u"), "version", 5)  # the CAS reads only the profile's version
    writer = _writer(
        ns, common={"redis_url": f"redis://127.0.0.1:{port}/0"}, cache_retry_budget_s=6.0
    )
    running = Running()
    running.start("cache", writer.run)
    topic = settings.topic_recommendations
    try:
        first = _recs("u", 1)
        _produce(settings, topic, [(b"u", first, None)])
        _wait_for(lambda: client.get(keys.recs("u")) == first, 30, "the first list")

        # A short outage: the writer retries and the list is written once Redis is back.
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        errors = CACHE_REDIS_ERRORS._value.get()
        second = _recs("u", 2)
        _produce(settings, topic, [(b"u", second, None)])
        _wait_for(lambda: CACHE_REDIS_ERRORS._value.get() > errors, 30, "a failed write")
        server = start_redis(port, tmp_path)
        _wait_for(lambda: client.get(keys.recs("u")) == second, 30, "the list after the outage")
        assert running.alive("cache")

        # An outage past the budget: the writer exits with the batch unacknowledged.
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        _produce(settings, topic, [(b"u", _recs("u", 3), None)])
        running.threads["cache"].join(60)
        assert isinstance(running.errors.get("cache"), CacheWriteError)
        assert not _committed_all(settings, ns.group("cache"), topic)
    finally:
        writer.stop()
        running.threads["cache"].join(30)
        if server.poll() is None:
            server.kill()
            server.wait(10)
        client.close()


def test_the_cache_writer_command_exits_non_zero_when_redis_stays_down(
    ns: Namespace, tmp_path: Path
) -> None:
    import sys

    from cli.supervise import Child
    from tests.conftest import settings_env

    env = {
        **settings_env(ns.settings),
        "RECSTREAM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        "RECSTREAM_CACHE_GROUP_ID": ns.group("cache"),
        "RECSTREAM_CACHE_RETRY_BUDGET_S": "1",
        "RECSTREAM_CACHE_METRICS_PORT": "0",
    }
    log = tmp_path / "cache-writer.log"
    child = Child.spawn("cache", [sys.executable, "-m", "cli", "serve", "cache-writer"], log, env)
    try:
        _produce(
            ns.settings,
            ns.settings.topic_recommendations,
            [(b"u", _recs("u", 1), None)],
        )
        assert child.process.wait(60) == 1  # for the supervisor to restart it
    finally:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait(10)
    assert "Redis kept failing" in log.read_text()
    assert not _committed_all(ns.settings, ns.group("cache"), ns.settings.topic_recommendations)
