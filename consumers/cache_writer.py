"""The cache writer: ``recommendations`` in, Redis ``recs:{user}`` out.

Each list is written with a TTL by an atomic compare-and-set (``cache_cas.lua``): a stored list
with a newer ``profile_version`` is never replaced by an older one, so the cache never goes
backwards, whatever order redeliveries or replays arrive in. The same script refuses a list whose
``profile_version`` is ahead of the user's stored profile (or whose user has no profile): a forged
version could otherwise lock the cache against every real list for the whole TTL. Messages are
written in batches, one pipelined round trip per batch; offsets are stored only after the batch is
in Redis and its dead letters are delivered (at-least-once; rewriting the same version is
harmless).

Every record ends as one outcome of ``recs_records_total{service="cache_writer"}``: ``folded``
(written), ``duplicate`` (older than the cached list) or ``dead_lettered`` (on
``recommendations.dlq`` with its original key and bytes and a :class:`~consumers.deadletter.
DeadReason`: unreadable, wrong contract, key not its user, oversize, version ahead, no profile).

A Redis error is retried with doubling backoff for ``cache_retry_budget_s``, the batch unacked;
past the budget the writer raises :class:`~consumers.exceptions.CacheWriteError` and exits
non-zero for its supervisor (never acked-and-lost, never an endless spin). Dead-letter deliveries
are retried the same way.

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
from collections.abc import Callable
from enum import IntEnum
from importlib import resources
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumers.deadletter import DeadReason, RecordRefusedError, decode, envelope
from consumers.exceptions import CacheWriteError, DeliveryError
from consumers.messages import at_least_once_consumer, commit_stored, position
from consumers.metrics import (
    CACHE_BATCH_SIZE,
    CACHE_FRESHNESS,
    CACHE_INVALID,
    CACHE_REDIS_ERRORS,
    CACHE_STALE,
    CACHE_WRITES,
    origin_ts,
)
from consumers.regenerate import Headers
from consumers.settings import CacheWriterSettings
from recstream import security
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.metrics import count
from schemas import Recommendations
from schemas.deadletter import dead_letter_headers

__all__ = ["CacheWriter", "CasOutcome", "RecsCache"]

log = logging.getLogger(__name__)

SERVICE = "cache_writer"

_REFUSALS = {3: DeadReason.NO_PROFILE, 2: DeadReason.VERSION_AHEAD}


class CasOutcome(IntEnum):
    """What ``cache_cas.lua`` did with one list."""

    STALE = 0
    WRITTEN = 1
    VERSION_AHEAD = 2
    NO_PROFILE = 3


class RecsCache:
    """Writes recommendation lists into Redis with the never-go-backwards compare-and-set."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int) -> None:
        self.client = client
        self.keys = keys
        self.ttl_ms = ttl_s * 1000
        source = resources.files("consumers").joinpath("cache_cas.lua").read_text()
        self._script = client.register_script(source)

    def write_many(self, lists: list[tuple[str, int, bytes]]) -> list[CasOutcome]:
        """Write ``(user_id, profile_version, json)`` triples; per triple, what the CAS did."""
        if not lists:
            return []
        pipe = self.client.pipeline(transaction=False)
        for user_id, version, payload in lists:
            self._script(
                keys=[self.keys.recs(user_id), self.keys.profile(user_id)],
                args=[payload, version, self.ttl_ms],
                client=pipe,
            )
        replies = pipe.execute()
        return [CasOutcome(int(r)) for r in replies]


_Dead = tuple[Message, DeadReason, str]


def _collect_failure(
    item: _Dead, failed: list[tuple[_Dead, KafkaError]]
) -> Callable[[KafkaError | None, Message], None]:
    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            failed.append((item, err))

    return on_delivery


class CacheWriter:
    """Consumes the output topic in batches and keeps ``recs:{user}`` current."""

    def __init__(
        self, settings: CacheWriterSettings, redis_client: redis.Redis | None = None
    ) -> None:
        self.settings = settings
        # A socket timeout: a Redis that hangs is an error to retry, not a writer stuck forever.
        client = redis_client or security.redis_client(
            settings, socket_timeout=5.0, socket_connect_timeout=5.0
        )
        self.cache = RecsCache(client, Keys(settings.key_prefix), settings.cache_ttl_s)
        self._stop = threading.Event()
        self.running = threading.Event()
        self.written = 0
        self.stale = 0
        self.dead_lettered = 0
        self.consumer = at_least_once_consumer(
            settings,
            settings.cache_group_id,
            settings.cache_stats_interval_ms,
            settings.group_instance_id,
        )
        self.producer = idempotent_producer(
            settings,
            linger_ms=1,
            message_timeout_ms=settings.cache_delivery_timeout_ms,
        )

    def stop(self) -> None:
        """Ask the loop to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    def run(self) -> None:
        """Consume until :meth:`stop`; each batch is written before its offsets are stored.

        Raises :class:`CacheWriteError` or :class:`DeliveryError` when Redis or the dead-letter
        topic keeps failing past the retry budget; stored offsets are committed either way.
        """
        self.consumer.subscribe([self.settings.topic_recommendations], on_revoke=self._on_revoke)
        self.running.set()
        try:
            while not self._stop.is_set():
                self.step()
        finally:
            self.running.clear()
            self._commit()
            self.consumer.close()
            self.producer.flush(5.0)
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
        accepted: list[Message] = []
        origins: list[tuple[str, float]] = []  # per list: (source, origin epoch seconds)
        dead: list[_Dead] = []
        positions: dict[tuple[str, int], int] = {}
        for message in messages:
            where = position(message)
            if where is None:
                continue
            topic, partition, offset = where
            count(SERVICE, topic, "in")
            positions[(topic, partition)] = max(positions.get((topic, partition), -1), offset)
            try:
                recs = decode(
                    Recommendations,
                    message.key(),
                    message.value(),
                    self.settings.cache_max_message_bytes,
                )
            except RecordRefusedError as refused:
                CACHE_INVALID.inc()
                log.warning(
                    "refused recommendations at %s/%d@%d: %s", topic, partition, offset, refused
                )
                dead.append((message, refused.reason, refused.detail))
                continue
            lists.append((recs.user_id, recs.profile_version, message.value() or b""))
            accepted.append(message)
            origin = origin_ts(message, SERVICE)
            origins.append(
                ("trigger_ts", recs.trigger_ts.timestamp())
                if origin is None
                else ("header", origin)
            )
        if lists:
            CACHE_BATCH_SIZE.observe(len(lists))
            outcomes = self._write_retrying(lists)
            if outcomes is None:  # stopping during an outage: nothing stored, all re-read
                return
            self._account(outcomes, accepted, lists, dead)
            self._observe_freshness(outcomes, origins)
        if dead and not self._dead_letter(dead):
            return
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

    def _account(
        self,
        outcomes: list[CasOutcome],
        accepted: list[Message],
        lists: list[tuple[str, int, bytes]],
        dead: list[_Dead],
    ) -> None:
        n_written = n_stale = 0
        for outcome, message, (_, version, _) in zip(outcomes, accepted, lists, strict=True):
            if outcome is CasOutcome.WRITTEN:
                n_written += 1
            elif outcome is CasOutcome.STALE:
                n_stale += 1
            else:
                reason = _REFUSALS[outcome]
                # No user id in logs (personal data): the dead letter names the record.
                log.warning(
                    "refused list at %s/%d@%d: %s",
                    message.topic(),
                    message.partition(),
                    message.offset(),
                    reason,
                )
                dead.append((message, reason, f"profile_version {version}"))
        self.written += n_written
        self.stale += n_stale
        CACHE_WRITES.inc(n_written)
        CACHE_STALE.inc(n_stale)
        topic = self.settings.topic_recommendations
        count(SERVICE, topic, "folded", n_written)
        count(SERVICE, topic, "duplicate", n_stale)

    def _write_retrying(self, lists: list[tuple[str, int, bytes]]) -> list[CasOutcome] | None:
        """The batch's CAS outcomes, retrying Redis errors; ``None`` if stopped meanwhile."""
        deadline = time.monotonic() + self.settings.cache_retry_budget_s
        backoff = 0.05
        while True:
            try:
                return self.cache.write_many(lists)
            except redis.RedisError as exc:
                CACHE_REDIS_ERRORS.inc()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CacheWriteError(
                        f"Redis kept failing for {self.settings.cache_retry_budget_s:g} s: {exc}"
                    ) from exc
                log.warning("Redis write failed (retrying in %.2f s): %s", backoff, exc)
                if self._stop.wait(min(backoff, left)):
                    return None
                backoff = min(backoff * 2, 2.0)

    def _dead_letter(self, dead: list[_Dead]) -> bool:
        """Deliver every dead letter (retrying); False if stopped before all were delivered."""
        topic = self.settings.topic_recommendations_dlq
        deadline = time.monotonic() + self.settings.cache_retry_budget_s
        backoff = 0.05
        pending = dead
        while pending:
            failed: list[tuple[_Dead, KafkaError]] = []
            for item in pending:
                message, reason, detail = item
                headers: Headers = [*dead_letter_headers(envelope(message), reason, detail)]
                self.producer.produce(
                    topic,
                    key=message.key(),
                    value=message.value(),
                    headers=headers,
                    on_delivery=_collect_failure(item, failed),
                )
            self.producer.flush(self.settings.cache_delivery_timeout_ms / 1000.0 + 5.0)
            delivered = len(pending) - len(failed)
            self.dead_lettered += delivered
            count(SERVICE, self.settings.topic_recommendations, "dead_lettered", delivered)
            pending = [item for item, _ in failed]
            if not pending:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeliveryError(f"dead letters to {topic!r} failed: {failed[0][1]}")
            log.warning("%d dead letters failed (retrying): %s", len(pending), failed[0][1])
            if self._stop.wait(min(backoff, left)):
                return False
            backoff = min(backoff * 2, 2.0)
        return True

    def _observe_freshness(
        self, outcomes: list[CasOutcome], origins: list[tuple[str, float]]
    ) -> None:
        now = time.time()
        max_trigger_age = self.settings.cache_freshness_trigger_max_age_s
        for outcome, (source, origin) in zip(outcomes, origins, strict=True):
            if outcome is not CasOutcome.WRITTEN:
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
