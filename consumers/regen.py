"""The change-triggered regeneration consumer: ``profiles.changed`` in, ``recommendations`` out.

For every user whose profile changed it reads the profile from Redis, asks the worker pool for a
fresh list and publishes a :class:`schemas.Recommendations` (key = user_id). The poll loop is one
thread and never runs model code: the pool computes in its own processes and hands results back
through a queue that the loop drains.

- **Coalescing**: changes of one user within ``debounce_ms`` (from the first) become one
  regeneration on the newest profile; a change already covered by a running regeneration's profile
  read rides along with it (see :mod:`consumers.coalesce`).
- **At-least-once**: ``enable.auto.offset.store`` is off; an offset is stored only once every
  message up to it has its result delivered to the output topic (or was dropped on purpose, e.g.
  invalid). Auto-commit commits stored offsets; a revoke commits synchronously. The output is
  idempotent by ``profile_version`` (the cache never goes backwards).
- **Backpressure**: when the pool's queue is full or too many users wait, the assigned partitions
  are paused (the loop keeps polling so the group membership stays alive) and resumed when the
  pool has room again.
- **Timing**: ``recs_regen_latency_seconds`` runs from the first coalesced change's consumption
  to the list's delivery; the ``recs.origin_ts`` header of the newest change is copied onto the
  published list, for the cache writer's end-to-end freshness.
- **Shutdown**: :meth:`RegenService.stop` only sets a flag (signal-safe); the loop then pauses
  input, starts what waits, drains in-flight work, flushes the producer, commits and closes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic import ValidationError

from consumers.coalesce import Coalescer, InFlight, OffsetTracker, Pending
from consumers.messages import at_least_once_consumer, commit_stored, position
from consumers.metrics import (
    REGEN_COALESCED,
    REGEN_FRESHNESS,
    REGEN_INVALID,
    REGEN_LATENCY,
    REGEN_MESSAGES,
    REGEN_MISSING_PROFILE,
    REGEN_PAUSED,
    REGEN_PENDING_USERS,
    REGEN_POLL_BATCH,
    REGEN_PUBLISH_ERRORS,
    REGEN_PUBLISHED,
    REGEN_REGENERATIONS,
    origin_ts,
)
from consumers.regenerate import RecsPublisher, model_history
from consumers.settings import RegenSettings
from inference.pool import PoolResult, PoolSaturatedError, WorkerPool
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from schemas import ModelRef, ProfileChanged
from streams.profile import read_profile

__all__ = ["RegenService", "build_pool"]

log = logging.getLogger(__name__)


def build_pool(settings: RegenSettings) -> WorkerPool:
    """The worker pool the settings describe (not started), serving a verified artifact.

    The catalog, the popularity fallback and the warm-up history come from the artifact itself,
    so the service needs no dataset; the model loads in the workers.
    """
    from inference.artifact import read_catalog
    from inference.exceptions import ArtifactError
    from inference.worker import ArtifactLoader

    if settings.regen_model_dir is None:
        raise ArtifactError(
            "the regeneration service serves a trained artifact: set the model directory "
            "(a folder written by `recstream train`)"
        )
    catalog = read_catalog(settings.regen_model_dir)
    fallback = catalog.popularity
    return WorkerPool(
        ArtifactLoader(settings.regen_model_dir, settings.regen_post),
        fallback,
        catalog.item_ids,
        settings.regen_pool,
        warmup_history=fallback.items[:20],
    )


@dataclass
class _Done:
    running: InFlight
    future: Future[PoolResult]


class RegenService:
    """Consumes profile changes, regenerates through the pool, publishes recommendations."""

    def __init__(
        self, settings: RegenSettings, pool: WorkerPool, redis_client: redis.Redis | None = None
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.keys = Keys(settings.key_prefix)
        self.redis = redis_client or redis.Redis.from_url(settings.redis_url.get_secret_value())
        self.coalescer = Coalescer(settings.regen_debounce_ms / 1000.0)
        self.offsets = OffsetTracker()
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._paused = False
        self._assignment: set[tuple[str, int]] = set()
        self.running = threading.Event()  # set once subscribed; for health checks and tests
        self.regenerations = 0
        self.pauses = 0  # times input was paused for backpressure
        self.consumer = at_least_once_consumer(
            settings.kafka_bootstrap, settings.regen_group_id, settings.regen_stats_interval_ms
        )
        self.producer = idempotent_producer(settings.kafka_bootstrap, linger_ms=1)
        self.publisher = RecsPublisher(
            self.producer, settings.topic_recommendations, settings.regen_variant
        )

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe to call from a signal handler or another thread)."""
        self._stop.set()

    def run(self) -> None:
        """Consume until :meth:`stop`, then drain, flush and close (always closes)."""
        self.consumer.subscribe(
            [self.settings.topic_profiles_changed],
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        self.running.set()
        try:
            while not self._stop.is_set():
                self._step(flush=False)
            self._drain()
        finally:
            self.running.clear()
            self.producer.flush(10.0)
            self._store_offsets()
            self._commit()
            self.consumer.close()
            log.info("regeneration consumer closed")

    def _drain(self) -> None:
        """Stop reading; start whatever waits and finish what runs, up to the drain timeout."""
        log.info("draining: %d waiting, %d running", len(self.coalescer), self._running_count())
        self._pause()
        deadline = time.monotonic() + self.settings.regen_drain_timeout_s
        while (len(self.coalescer) or self._running_count()) and time.monotonic() < deadline:
            self._step(flush=True)
        self.producer.flush(max(deadline - time.monotonic(), 1.0))
        self.producer.poll(0)

    def _running_count(self) -> int:
        return len(self.coalescer.inflight)

    # -- the loop ----------------------------------------------------------------------------

    def _step(self, flush: bool) -> None:
        now = time.monotonic()
        due = self.coalescer.next_due()
        wait = 0.05 if due is None else min(max(due - now, 0.0), 0.05)
        if not self._done.empty():
            wait = 0.0
        elif self.coalescer.inflight:
            # librdkafka's poll cannot be woken by a finished result: poll briefly instead.
            wait = min(wait, 0.002)
        # poll() returns on the first message; consume(timeout=0) then takes what is already
        # fetched. (consume() with a timeout waits for the whole batch or the whole timeout.)
        first = self.consumer.poll(wait)
        messages = [] if first is None else [first, *self.consumer.consume(499, timeout=0)]
        now = time.monotonic()
        if messages:
            REGEN_POLL_BATCH.observe(len(messages))
        for message in messages:
            self._accept(message, now)
        self._publish_finished()
        self._start_due(now, flush)
        self._backpressure()
        self.producer.poll(0)
        REGEN_PENDING_USERS.set(len(self.coalescer))

    def _accept(self, message: Message, now: float) -> None:
        where = position(message)
        if where is None:
            return
        topic, partition, offset = where
        self.offsets.received(topic, partition, offset)
        REGEN_MESSAGES.inc()
        try:
            change = ProfileChanged.model_validate_json(message.value() or b"")
        except ValidationError as exc:
            # Nothing can be regenerated from it; counted, logged, and its offset moves on.
            REGEN_INVALID.inc()
            log.warning("invalid change at %s/%d@%d: %s", topic, partition, offset, exc)
            self._mark_done([(topic, partition, offset)])
            return
        fresh = self.coalescer.add(
            change.user_id,
            change.profile_version,
            change.trigger_ts,
            (topic, partition, offset),
            now,
            origin_ts=origin_ts(message),
        )
        if not fresh:
            REGEN_COALESCED.inc()

    def _start_due(self, now: float, flush: bool) -> None:
        room = self.pool.capacity
        if room <= 0:
            return
        for entry in self.coalescer.take_due(now, room, flush=flush):
            profile = read_profile(self.redis, self.keys, entry.user_id)
            if profile is None:
                REGEN_MISSING_PROFILE.inc()
                log.warning("no profile for user %r; change dropped", entry.user_id)
                self._mark_done(entry.positions)
                continue
            try:
                future = self.pool.submit(model_history(profile), self.settings.regen_k)
            except PoolSaturatedError:
                self.coalescer.put_back(entry)
                break
            self._started(entry, profile.version, future)

    def _started(self, entry: Pending, read_version: int, future: Future[PoolResult]) -> None:
        # A profile behind its announcement (Redis restored from an older state) is served under
        # the announced version, so the change counts as answered and is not requested again.
        running = self.coalescer.start(entry, max(read_version, entry.version))
        REGEN_COALESCED.inc(max(running.changes - 1, 0))
        done = _Done(running, future)
        future.add_done_callback(lambda _f: self._done.put(done))

    def _publish_finished(self) -> None:
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return
            running = done.running
            self.coalescer.finish(running.user_id)
            result = done.future.result()
            REGEN_REGENERATIONS.labels(result.source).inc()
            self.regenerations += 1
            self.publisher.publish(
                running.user_id,
                result.items,
                profile_version=running.read_version,
                model=ModelRef(name=result.model_name, version=result.model_version),
                source=result.source,
                trigger_ts=running.trigger_ts,
                origin_ts=running.origin_ts,
                on_delivery=partial(self._delivered, running),
            )

    def _delivered(self, running: InFlight, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            # Offsets stay open: after a restart these changes are consumed again.
            REGEN_PUBLISH_ERRORS.inc()
            log.error("publishing recommendations for %r failed: %s", running.user_id, err)
            return
        REGEN_PUBLISHED.inc()
        REGEN_LATENCY.observe(max(time.monotonic() - running.received, 0.0))
        REGEN_FRESHNESS.observe(max(time.time() - running.trigger_ts.timestamp(), 0.0))
        self._mark_done(running.positions)

    def _mark_done(self, positions: list[tuple[str, int, int]]) -> None:
        for topic, partition, offset in positions:
            self.offsets.done(topic, partition, offset)
        self._store_offsets({(t, p) for t, p, _ in positions})

    def _store_offsets(self, partitions: set[tuple[str, int]] | None = None) -> None:
        wanted = self._assignment if partitions is None else partitions & self._assignment
        stores = []
        for topic, partition in wanted:
            offset = self.offsets.committable(topic, partition)
            if offset is not None:
                stores.append(TopicPartition(topic, partition, offset))
        if stores:
            try:
                self.consumer.store_offsets(offsets=stores)
            except KafkaException as exc:  # partition revoked meanwhile: the new owner re-reads
                log.info("offsets not stored: %s", exc)

    def _commit(self) -> None:
        commit_stored(self.consumer)

    # -- backpressure and rebalancing --------------------------------------------------------

    def _backpressure(self) -> None:
        pending = len(self.coalescer)
        full = self.pool.capacity == 0 or pending >= self.settings.regen_max_pending_users
        roomy = (
            self.pool.capacity >= self.pool.config.queue_size // 2
            and pending < self.settings.regen_max_pending_users // 2
        )
        if full and not self._paused:
            self._pause()
        elif self._paused and roomy and not self._stop.is_set():
            self.consumer.resume(self._partitions())
            self._paused = False
            REGEN_PAUSED.set(0)

    def _pause(self) -> None:
        if not self._paused:
            self.consumer.pause(self._partitions())
            self._paused = True
            self.pauses += 1
            REGEN_PAUSED.set(1)

    def _partitions(self) -> list[TopicPartition]:
        return [TopicPartition(t, p) for t, p in sorted(self._assignment)]

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._assignment |= {(tp.topic, tp.partition) for tp in partitions}
        if self._paused and partitions:
            consumer.pause(partitions)
        log.info("assigned %s", [f"{tp.topic}/{tp.partition}" for tp in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self._store_offsets(revoked)
        self._commit()
        self._forget(revoked)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._forget({(tp.topic, tp.partition) for tp in partitions})

    def _forget(self, partitions: set[tuple[str, int]]) -> None:
        dropped = self.coalescer.forget(partitions)
        self.offsets.forget(partitions)
        self._assignment -= partitions
        log.info("revoked %s (%d waiting users handed over)", sorted(partitions), dropped)

    # -- health ------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        pool = self.pool.health(timeout=2.0)
        detail = {
            "consuming": self.running.is_set(),
            "paused": self._paused,
            "waiting_users": len(self.coalescer),
            "pool": pool,
        }
        return bool(pool["ok"]) and self.running.is_set(), detail
