"""The cache writer: ``recommendations`` in, Redis ``recs:{user}`` out.

Each list is written with a TTL by an atomic compare-and-set (``cache_cas.lua``): a stored list
with a newer ``profile_version`` is never replaced by an older one, so the cache never goes
backwards, whatever order redeliveries or replays arrive in. Messages are written in batches, one
pipelined round trip per batch; offsets are stored only after the batch is in Redis
(at-least-once; rewriting the same version is harmless).

The stored value is the message's JSON exactly as published (the contract of DESIGN.md).

``recs_cache_freshness_seconds`` is observed per list actually written (stale rejections are not),
once its batch's Redis round trip has returned: wall clock now minus the list's origin time. The
origin is the ``recs.origin_ts`` header (``source="header"``): the Kafka produce timestamp of the
clickstream record that triggered the profile change, so the measure spans the fold, the debounce,
the regeneration, both Kafka hops and the Redis write. Lists without it (published by something
that does not carry the header) fall back to the event's own ``trigger_ts`` (``source=
"trigger_ts"``, the client's clock) when it is at most ``freshness_trigger_max_age_s`` old, and are
not observed otherwise: a replay of old events would report their age, not the pipeline's.
"""

from __future__ import annotations

import logging
import threading
import time
from importlib import resources
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaException, Message, TopicPartition
from pydantic import ValidationError

from consumers.messages import at_least_once_consumer, commit_stored, position
from consumers.metrics import (
    CACHE_BATCH_SIZE,
    CACHE_FRESHNESS,
    CACHE_INVALID,
    CACHE_STALE,
    CACHE_WRITES,
    origin_ts,
)
from consumers.settings import CacheWriterSettings
from recstream.keys import Keys
from schemas import Recommendations

__all__ = ["CacheWriter", "RecsCache"]

log = logging.getLogger(__name__)


class RecsCache:
    """Writes recommendation lists into Redis with the never-go-backwards compare-and-set."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = ttl_s * 1000
        source = resources.files("consumers").joinpath("cache_cas.lua").read_text()
        self._script = client.register_script(source)

    def write_many(self, lists: list[tuple[str, int, bytes]]) -> list[bool]:
        """Write ``(user_id, profile_version, json)`` triples; per triple, written (not stale)."""
        if not lists:
            return []
        pipe = self.client.pipeline(transaction=False)
        for user_id, version, payload in lists:
            self._script(
                keys=[self.keys.recs(user_id)], args=[payload, version, self.ttl_ms], client=pipe
            )
        replies = pipe.execute()
        return [int(r) == 1 for r in replies]


class CacheWriter:
    """Consumes the output topic in batches and keeps ``recs:{user}`` current."""

    def __init__(
        self, settings: CacheWriterSettings, redis_client: redis.Redis | None = None
    ) -> None:
        self.settings = settings
        client = redis_client or redis.Redis.from_url(settings.redis_url.get_secret_value())
        self.cache = RecsCache(client, Keys(settings.key_prefix), settings.cache_ttl_s)
        self._stop = threading.Event()
        self.running = threading.Event()
        self.written = 0
        self.stale = 0
        self.consumer = at_least_once_consumer(
            settings.kafka_bootstrap, settings.cache_group_id, settings.cache_stats_interval_ms
        )

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    def run(self) -> None:
        """Consume until :meth:`stop`; each batch is written before its offsets are stored."""
        self.consumer.subscribe([self.settings.topic_recommendations], on_revoke=self._on_revoke)
        self.running.set()
        try:
            while not self._stop.is_set():
                self.step()
        finally:
            self.running.clear()
            self._commit()
            self.consumer.close()
            log.info("cache writer closed")

    def step(self) -> int:
        """Read one batch, write it, store its offsets; returns the number of messages."""
        # poll() returns on the first message (consume() with a timeout would wait it out).
        first = self.consumer.poll(0.1)
        if first is None:
            return 0
        messages = [first, *self.consumer.consume(self.settings.cache_batch_size - 1, timeout=0)]
        # A partial batch waits briefly for company: fewer round trips under load.
        deadline = time.monotonic() + self.settings.cache_batch_wait_ms / 1000.0
        while len(messages) < self.settings.cache_batch_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            more = self.consumer.consume(
                num_messages=self.settings.cache_batch_size - len(messages), timeout=left
            )
            if not more:
                break
            messages += more
        self._write(messages)
        return len(messages)

    def _write(self, messages: list[Message]) -> None:
        lists: list[tuple[str, int, bytes]] = []
        origins: list[tuple[str, float]] = []  # per list: (source, origin epoch seconds)
        positions: dict[tuple[str, int], int] = {}
        for message in messages:
            where = position(message)
            if where is None:
                continue
            topic, partition, offset = where
            positions[(topic, partition)] = max(positions.get((topic, partition), -1), offset)
            payload = message.value() or b""
            try:
                recs = Recommendations.model_validate_json(payload)
            except ValidationError as exc:
                CACHE_INVALID.inc()
                log.warning(
                    "invalid recommendations at %s/%d@%d: %s", topic, partition, offset, exc
                )
                continue
            lists.append((recs.user_id, recs.profile_version, payload))
            origin = origin_ts(message)
            origins.append(
                ("trigger_ts", recs.trigger_ts.timestamp())
                if origin is None
                else ("header", origin)
            )
        if lists:
            CACHE_BATCH_SIZE.observe(len(lists))
            written = self.cache.write_many(lists)
            n_written = sum(written)
            self.written += n_written
            self.stale += len(written) - n_written
            CACHE_WRITES.inc(n_written)
            CACHE_STALE.inc(len(written) - n_written)
            self._observe_freshness(written, origins)
        if positions:
            try:
                self.consumer.store_offsets(
                    offsets=[
                        TopicPartition(topic, partition, offset + 1)
                        for (topic, partition), offset in positions.items()
                    ]
                )
            except KafkaException as exc:  # revoked meanwhile: the new owner rewrites (harmless)
                log.info("offsets not stored: %s", exc)

    def _observe_freshness(self, written: list[bool], origins: list[tuple[str, float]]) -> None:
        now = time.time()
        max_trigger_age = self.settings.cache_freshness_trigger_max_age_s
        for ok, (source, origin) in zip(written, origins, strict=True):
            if not ok:
                continue
            age = max(now - origin, 0.0)
            if source == "trigger_ts" and age > max_trigger_age:
                continue
            CACHE_FRESHNESS.labels(source).observe(age)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._commit()

    def _commit(self) -> None:
        commit_stored(self.consumer)

    def health(self) -> tuple[bool, dict[str, Any]]:
        try:
            redis_ok = bool(self.cache.client.ping())
        except redis.RedisError:
            redis_ok = False
        ok = redis_ok and self.running.is_set()
        return ok, {"consuming": self.running.is_set(), "redis": redis_ok}
