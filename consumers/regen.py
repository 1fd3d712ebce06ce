"""The change-triggered regeneration consumer: ``profiles.changed`` in, ``recommendations`` out.

For every user whose profile changed it reads the profile from Redis, asks the worker pool for a
fresh list and publishes a :class:`schemas.Recommendations` (key = user_id). The poll loop is one
thread and never runs model code: the pool computes in its own processes and hands results back
through a queue that the loop drains.

- **Coalescing**: changes of one user within ``debounce_ms`` (from the first) become one
  regeneration on the newest profile; a change already covered by a running regeneration's profile
  read rides along with it (see :mod:`consumers.coalesce`).
- **At-least-once**: ``enable.auto.offset.store`` is off; an offset is stored only once every
  message up to it has its result delivered to the output topic, or its dead letter delivered.
  Auto-commit commits stored offsets; a revoke commits synchronously. The output is idempotent by
  ``profile_version`` (the cache never goes backwards).
- **Refusals**: a record that is not a ``ProfileChanged`` keyed by its user, or whose
  ``profile_version`` is ahead of the profile stored in Redis (forged, or Redis restored from an
  older state), or whose user has no profile, goes to ``profiles.changed.dlq`` with its original
  key and bytes and a :class:`~consumers.deadletter.DeadReason`; a list is never served under a
  version the profile does not have. Every record ends as one outcome of
  ``recs_records_total{service="regen"}``: ``folded`` (one per list delivered), ``duplicate``
  (the other changes that list answers: coalesced, superseded) or ``dead_lettered``.
- **Delivery failures**: a list or dead letter the broker refuses is sent again with doubling
  backoff, up to ``regen_delivery_attempts``; past them :meth:`RegenService.run` raises
  :class:`~consumers.exceptions.DeliveryError` and the service exits non-zero (that work's offsets
  were never stored, so the restarted service redoes it). A worker pool whose I/O thread died
  raises from ``submit`` the same way.
- **Backpressure**: when the pool's queue is full or too many users wait, the assigned partitions
  are paused (the loop keeps polling so the group membership stays alive) and resumed when the
  pool has room again.
- **Timing**: ``recs_regen_latency_seconds`` runs from the first coalesced change's consumption
  to the list's delivery; the ``recs.origin_ts`` header of the newest change is copied onto the
  published list, for the cache writer's end-to-end freshness.
- **Conversations**: while the user has a conversation session (``POST
  /v1/users/{id}/conversation``, ``schemas.conversation``) with constraints, the pool is asked
  for the whole ranking and the list is its best ``regen_k`` items that meet them
  (``inference.conversation.SessionRefiner``), published with ``source: "refined"``: the
  conversation steers the live stream until the session expires.
- **Recent popularity**: when the served model blends it (``inference.trending``), the window
  of the stream worker's per-day counts, ending on the most common day of the changes
  arriving, is read every few
  seconds (:class:`consumers.regenerate.RecentCounts`) and handed to the pool's workers, so a
  user with a very short history gets what is popular now in their list. A blend for returning
  users only (``TrendingConfig.idle_s``) is left out of the lists made as events are folded;
  the service makes a short history's list again once its user has been away that long, then
  daily (:mod:`consumers.returning`), and publishes it like any other (no change behind it, so
  no offset and no freshness sample: ``recs_regen_returning_total``).
- **Reasons**: each item of a model's list carries ``because``, up to three of the user's history
  items behind it (the workers' ``inference.reasons.weight_reasons``, checked by the pool to be
  the user's own), with their catalog titles (``consumers.regenerate.ItemTitles``); an item that
  recent popularity brought into a short history's list also carries ``popular`` (how many users
  took it up in the window).
- **Shutdown**: :meth:`RegenService.stop` only sets a flag (signal-safe); the loop then pauses
  input, starts what waits, drains in-flight work, flushes the producer, commits and closes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any

import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from consumers.coalesce import Coalescer, InFlight, OffsetTracker, Pending, Position
from consumers.deadletter import DeadReason, RecordRefusedError, decode, envelope
from consumers.exceptions import DeliveryError, RedisUnavailableError
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
    REGEN_RETURNING,
    origin_ts,
)
from consumers.regenerate import (
    Headers,
    ItemTitles,
    RecentCounts,
    Record,
    RecsPublisher,
    model_history,
)
from consumers.returning import ReturningUsers
from consumers.settings import RegenSettings
from inference.conversation import SessionRefiner, parse_session, read_catalog_attributes
from inference.exceptions import InferenceError
from inference.pool import PoolBrokenError, PoolResult, PoolSaturatedError, WorkerPool
from recstream import security
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.metrics import count
from schemas import ModelRef, Profile, ProfileChanged
from schemas.conversation import Constraints, Session, session_key
from schemas.deadletter import dead_letter_headers
from streams.profile import read_profile, read_profile_and

__all__ = ["RegenService", "build_pool"]

log = logging.getLogger(__name__)

SERVICE = "regen"


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
    catalog = read_catalog(settings.regen_model_dir, settings.regen_artifact)
    fallback = catalog.popularity
    return WorkerPool(
        ArtifactLoader(settings.regen_model_dir, settings.regen_post, settings.regen_artifact),
        fallback,
        catalog.item_ids,
        settings.regen_pool,
        warmup_history=fallback.items[:20],
    )


@dataclass
class _Done:
    running: InFlight
    future: Future[PoolResult]
    constraints: Constraints | None = None  # the user's conversation session's, if any


@dataclass(eq=False)
class _Outgoing:
    """A record the service owes the broker (a list or a dead letter) and what it settles."""

    record: Record
    on_delivered: Callable[[], None]
    attempts: int = 0


class RegenService:
    """Consumes profile changes, regenerates through the pool, publishes recommendations."""

    def __init__(
        self, settings: RegenSettings, pool: WorkerPool, redis_client: redis.Redis | None = None
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.keys = Keys(settings.key_prefix)
        self.redis = redis_client or security.redis_client(settings)
        self.coalescer = Coalescer(settings.regen_debounce_ms / 1000.0)
        self.offsets = OffsetTracker()
        self._done: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._paused = False
        self._assignment: set[tuple[str, int]] = set()
        self.running = threading.Event()  # set once subscribed; for health checks and tests
        self.regenerations = 0
        self.pauses = 0  # times input was paused for backpressure
        # Every open position's record and announced version, so that any of them can still be
        # dead-lettered with its original bytes after it was coalesced.
        self._records: dict[Position, tuple[Message, int]] = {}
        self._retries: list[tuple[float, _Outgoing]] = []  # (due, record), waiting to resend
        self._outstanding = 0  # records produced whose delivery is not settled
        self._failure: DeliveryError | None = None
        self._redis_down_since: float | None = None  # first failed profile read of an outage
        self._redis_retry_at = 0.0
        self._refiner: SessionRefiner | None = None  # loaded at the first session seen
        self._sessions_refused = False  # the ACL refused a session or the catalog: stop trying
        self._catalog_missing = False  # said once: no catalog loaded to apply sessions with
        self.consumer = at_least_once_consumer(
            settings,
            settings.regen_group_id,
            settings.regen_stats_interval_ms,
            settings.group_instance_id,
        )
        self.producer = idempotent_producer(
            settings,
            linger_ms=1,
            message_timeout_ms=settings.regen_delivery_timeout_ms,
        )
        self.publisher = RecsPublisher(
            self.producer,
            settings.topic_recommendations,
            settings.regen_variant,
            ItemTitles(self.redis, self.keys),
        )
        # The window of recent popularity the served model blends into short histories' lists.
        self.recent: RecentCounts | None = None
        if pool.recent_days > 0:
            self.recent = RecentCounts(
                self.redis,
                self.keys,
                pool.recent_days,
                refresh_s=settings.regen_trending_refresh_s,
            )
        self._recent_sent: dict[str, int] | None = None
        self._recent_day: int | None = None  # the window's last day when it was last logged
        # Returning users' lists, when the blend is for them only (consumers.returning), and
        # the clock they are due by: the newest event time seen (epoch s).
        self.returning: ReturningUsers | None = None
        if self.recent is not None and pool.recent_idle_s > 0:
            self.returning = ReturningUsers(
                self.redis, self.keys, pool.recent_idle_s, pool.recent_below
            )
        self._event_clock: float | None = None
        self._swept_at = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe to call from a signal handler or another thread)."""
        self._stop.set()

    def run(self) -> None:
        """Consume until :meth:`stop`, then drain, flush and close (always closes).

        Raises :class:`DeliveryError` when a record stays undeliverable past the retry budget,
        and the pool's errors when it is broken; only finished work's offsets are committed.
        """
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
        while (
            len(self.coalescer) or self._running_count() or self._outstanding
        ) and time.monotonic() < deadline:
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
        self._refresh_recent()
        self._claim_returning(now, flush)
        self._start_due(now, flush)
        self._backpressure()
        self.producer.poll(0)
        self._resend_due(time.monotonic())
        REGEN_PENDING_USERS.set(len(self.coalescer))
        if self._failure is not None:
            raise self._failure
        if self.pool.broken is not None:  # nothing would answer: exit for the supervisor
            raise PoolBrokenError(f"the worker pool is broken: {self.pool.broken}")

    def _accept(self, message: Message, now: float) -> None:
        where = position(message)
        if where is None:
            return
        topic, partition, offset = where
        self.offsets.received(topic, partition, offset)
        REGEN_MESSAGES.inc()
        count(SERVICE, topic, "in")
        try:
            change = decode(
                ProfileChanged,
                message.key(),
                message.value(),
                self.settings.regen_max_message_bytes,
            )
        except RecordRefusedError as refused:
            REGEN_INVALID.inc()
            log.warning("refused change at %s/%d@%d: %s", topic, partition, offset, refused)
            self._records[where] = (message, 0)
            self._dead_letter(where, refused.reason, refused.detail)
            return
        self._records[where] = (message, change.profile_version)
        if self.recent is not None and change.changes.new_items:
            # Only a change that brought items in says which day's counts grow: a conversation
            # turn is stamped when it was said, and a replay's stale turns must not pull the
            # window away from the events being folded.
            self.recent.saw(change.trigger_ts)
            # The same for the clock returning users are due by, never ahead of the wall's.
            seen = min(change.trigger_ts.timestamp(), time.time())
            self._event_clock = max(self._event_clock or seen, seen)
        fresh = self.coalescer.add(
            change.user_id,
            change.profile_version,
            change.trigger_ts,
            where,
            now,
            origin_ts=origin_ts(message, SERVICE),
        )
        if not fresh:
            REGEN_COALESCED.inc()

    def _refresh_recent(self) -> None:
        """Hand the pool the window's recent-popularity counts when they are due and changed
        (before the lists they are for are submitted)."""
        if self.recent is None or not self.recent.due():
            return
        counts = self.recent.read()
        if counts is None:
            return
        latest = self.recent.latest
        if latest != self._recent_day:  # each move is logged, onto empty days too
            log.info(
                "recent popularity: %d items counted in the %d days to day %s",
                len(counts),
                self.recent.days,
                latest,
            )
            self._recent_day = latest
        if counts is not self._recent_sent:
            self.pool.set_recent(counts)
            self._recent_sent = counts

    def _claim_returning(self, now: float, flush: bool) -> None:
        """Queue the returning users whose lists are due by the event clock (at most every
        ``regen_returning_poll_s``, and as many as the pool has room for)."""
        if self.returning is None or self._event_clock is None or flush:
            return
        if now - self._swept_at < self.settings.regen_returning_poll_s:
            return
        self._swept_at = now
        room = self.pool.capacity - len(self.coalescer)
        if room <= 0 or now < self._redis_retry_at:
            return
        try:
            claimed = self.returning.claim(self._event_clock, room)
        except redis.exceptions.NoPermissionError:
            self._returning_refused()
            return
        except redis.RedisError as exc:  # the next sweep asks again; nothing was claimed
            log.warning("returning users: the schedule could not be read: %s", exc)
            return
        for user, due in claimed:
            self.coalescer.refresh(user, due, datetime.fromtimestamp(due, UTC), now)

    def _start_due(self, now: float, flush: bool) -> None:
        room = self.pool.capacity
        if room <= 0 or now < self._redis_retry_at:
            return
        scheduled: list[tuple[str, float]] = []
        try:
            self._start_entries(now, room, flush, scheduled)
        finally:
            self._schedule_returning(scheduled)

    def _schedule_returning(self, users: list[tuple[str, float]]) -> None:
        """(Re)set the returning-user schedule of the short histories just regenerated."""
        if self.returning is None or not users:
            return
        try:
            REGEN_RETURNING.labels("scheduled").inc(self.returning.schedule(users))
        except redis.exceptions.NoPermissionError:
            self._returning_refused()
        except redis.RedisError as exc:  # their next change schedules them again
            log.warning("returning users: %d could not be scheduled: %s", len(users), exc)

    def _returning_refused(self) -> None:
        """A deployment whose ACL predates the schedule: lists are made as events are folded
        only (the model's alone), rather than the service failing on every change."""
        log.warning("returning users' lists are not made again: this principal may not write")
        self.returning = None

    def _returning_dropped(self, entry: Pending, profile: Profile | None, length: int) -> bool:
        """For a returning user's entry: whether the user is dropped from the schedule instead
        (no profile, a history the blend no longer applies to, the horizon passed)."""
        assert entry.returning is not None
        if self.returning is None:  # refused since it was claimed
            return True
        if (
            profile is not None
            and self.returning.wanted(length)
            and not self.returning.expired(entry.returning, profile.last_event_ts.timestamp())
        ):
            return False
        try:
            self.returning.drop([entry.user_id])
        except redis.RedisError as exc:  # claimed a day on: asked again then
            log.warning("returning users: could not drop one: %s", exc)
        REGEN_RETURNING.labels("dropped").inc()
        return True

    def _start_entries(
        self, now: float, room: int, flush: bool, scheduled: list[tuple[str, float]]
    ) -> None:
        for entry in self.coalescer.take_due(now, room, flush=flush):
            try:
                profile, session = self._read_user(entry.user_id)
                constraints = self._session_constraints(session)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Includes LOADING (a restarted Redis replaying its AOF). Stay in the group and
                # keep the work: a crash would cost a restart and the model's load.
                self.coalescer.put_back(entry)
                self._redis_unavailable(exc, now)
                return
            self._redis_down_since = None
            history = [] if profile is None else model_history(profile)
            if entry.returning is not None:
                if self._returning_dropped(entry, profile, len(history)):
                    continue
                assert profile is not None
                entry.trigger_ts = profile.last_event_ts  # the event the list follows
            if profile is None:
                REGEN_MISSING_PROFILE.inc()
                for where in entry.positions:
                    self._dead_letter(where, DeadReason.NO_PROFILE, "no stored profile")
                continue
            if not self._refuse_ahead(entry, profile.version):
                continue
            k = self.settings.regen_k if constraints is None else SessionRefiner.ALL_ITEMS
            again = entry.returning is not None
            try:
                future = self.pool.submit(history, k, returning=again)
            except PoolSaturatedError:
                self.coalescer.put_back(entry)
                break
            self._started(entry, profile.version, future, constraints)
            if not again and self.returning is not None and self.returning.wanted(len(history)):
                scheduled.append((entry.user_id, profile.last_event_ts.timestamp()))

    def _read_user(self, user_id: str) -> tuple[Profile | None, Session | None]:
        """The user's profile and live conversation session, in one round trip."""
        if not self._sessions_refused:
            try:
                profile, raw = read_profile_and(
                    self.redis, self.keys, user_id, session_key(self.keys, user_id)
                )
                return profile, parse_session(raw)
            except redis.exceptions.NoPermissionError:
                # A deployment whose ACL does not let this principal read sessions: lists stay
                # unrefined rather than the service failing on every change.
                log.warning("conversation sessions are not applied: this principal may not read")
                self._sessions_refused = True
        return read_profile(self.redis, self.keys, user_id), None

    def _session_constraints(self, session: Session | None) -> Constraints | None:
        """The constraints of the user's conversation session, when one is live and this
        service can apply them (the catalog is loaded)."""
        if self._sessions_refused:
            return None
        if session is None or session.constraints.empty:
            return None
        if self._refiner is None:
            try:
                attributes = read_catalog_attributes(self.redis, self.keys)
            except redis.exceptions.NoPermissionError:
                log.warning(
                    "conversation sessions are not applied: this principal may not read the catalog"
                )
                self._sessions_refused = True
                return None
            except InferenceError as exc:  # no catalog loaded yet: tried again at the next one
                if not self._catalog_missing:
                    log.warning("a conversation session is not applied: %s", exc)
                self._catalog_missing = True
                return None
            index = None
            if self.settings.regen_model_dir is not None:
                from inference.artifact import read_item_index

                try:
                    index = read_item_index(
                        self.settings.regen_model_dir, self.settings.regen_artifact
                    )
                except InferenceError as exc:  # ArtifactError: "like" will not reorder
                    log.warning("conversation sessions are applied without item vectors: %s", exc)
            self._refiner = SessionRefiner(attributes, index)
        return session.constraints

    def _redis_unavailable(self, exc: redis.RedisError, now: float) -> None:
        """Retry the profile reads with backoff; past ``regen_redis_retry_s`` raise."""
        if self._redis_down_since is None:
            self._redis_down_since = now
            log.warning("Redis unavailable, holding regenerations: %s", exc)
        down_s = now - self._redis_down_since
        if down_s > self.settings.regen_redis_retry_s:
            raise RedisUnavailableError(f"Redis unavailable for {down_s:.0f}s: {exc}") from exc
        self._redis_retry_at = now + min(0.05 * 2 ** int(down_s), 1.0)

    def _refuse_ahead(self, entry: Pending, stored: int) -> bool:
        """Dead-letter the entry's changes announcing a version the profile does not have.

        Returns whether any change is left to regenerate for. A list is only ever served under
        the version read, so a forged ``profile_version`` can never reach the cache.
        """
        if entry.version <= stored:
            return True
        kept: list[Position] = []
        for where in entry.positions:
            announced = self._records[where][1] if where in self._records else 0
            if announced > stored:
                detail = f"profile_version {announced} > stored {stored}"
                self._dead_letter(where, DeadReason.VERSION_AHEAD, detail)
            else:
                kept.append(where)
        entry.positions = kept
        entry.changes = len(kept)
        entry.version = stored
        return bool(kept)

    def _started(
        self,
        entry: Pending,
        read_version: int,
        future: Future[PoolResult],
        constraints: Constraints | None = None,
    ) -> None:
        running = self.coalescer.start(entry, read_version)
        REGEN_COALESCED.inc(max(running.changes - 1, 0))
        done = _Done(running, future, constraints)
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
            items = result.items
            if done.constraints is not None and self._refiner is not None:
                items = self._refiner.apply(items, done.constraints, self.settings.regen_k)
            recs = self.publisher.build(
                running.user_id,
                items[: self.settings.regen_k],
                profile_version=running.read_version,
                model=ModelRef(name=result.model_name, version=result.model_version),
                source=result.source,
                trigger_ts=running.trigger_ts,
                reasons=result.reasons,
            )
            if done.constraints is not None and result.source == "model":
                recs = recs.model_copy(update={"source": "refined"})
            record = self.publisher.record(recs, running.origin_ts)
            self._send(_Outgoing(record, partial(self._published, running)))

    def _published(self, running: InFlight) -> None:
        REGEN_PUBLISHED.inc()
        if running.returning:  # no change behind it: nothing to time or account for
            REGEN_RETURNING.labels("published").inc()
            return
        REGEN_LATENCY.observe(max(time.monotonic() - running.received, 0.0))
        REGEN_FRESHNESS.observe(max(time.time() - running.trigger_ts.timestamp(), 0.0))
        # One change made the list; the others it answers were coalesced into it.
        topic = self.settings.topic_profiles_changed
        count(SERVICE, topic, "folded", min(len(running.positions), 1))
        count(SERVICE, topic, "duplicate", max(len(running.positions) - 1, 0))
        self._mark_done(running.positions)

    # -- delivery: lists and dead letters, retried -------------------------------------------

    def _dead_letter(self, where: Position, reason: DeadReason, detail: str) -> None:
        """Send the record at ``where`` to the DLQ; its offset is done once that is delivered."""
        if where not in self._records:  # its partition was revoked: the new owner decides
            return
        message = self._records[where][0]
        headers: Headers = [*dead_letter_headers(envelope(message), reason, detail)]
        record = Record(
            self.settings.topic_profiles_changed_dlq, message.key(), message.value(), headers
        )
        self._send(_Outgoing(record, partial(self._dead_lettered, where)))

    def _dead_lettered(self, where: Position) -> None:
        count(SERVICE, where[0], "dead_lettered")
        self._mark_done([where])

    def _send(self, out: _Outgoing) -> None:
        topic, key, value, headers = out.record
        self._outstanding += 1
        try:
            self.producer.produce(
                topic,
                key=key,
                value=value,
                headers=headers,
                on_delivery=partial(self._delivery, out),
            )
        except (BufferError, KafkaException) as exc:  # refused locally: same as a failed delivery
            self._outstanding -= 1
            self._attempt_failed(out, str(exc))

    def _delivery(self, out: _Outgoing, err: KafkaError | None, _msg: Message) -> None:
        self._outstanding -= 1
        if err is None:
            out.on_delivered()
        else:
            self._attempt_failed(out, str(err))

    def _attempt_failed(self, out: _Outgoing, error: str) -> None:
        REGEN_PUBLISH_ERRORS.inc()
        out.attempts += 1
        budget = self.settings.regen_delivery_attempts
        if out.attempts >= budget:
            # Offsets stay open: the restarted service consumes these changes again.
            log.error("delivery to %r failed %d times: %s", out.record.topic, budget, error)
            self._failure = self._failure or DeliveryError(
                f"delivery to {out.record.topic!r} failed {budget} times: {error}"
            )
            return
        backoff = self.settings.regen_retry_backoff_s * 2 ** (out.attempts - 1)
        log.warning(
            "delivery to %r failed (attempt %d, retrying in %.2f s): %s",
            out.record.topic,
            out.attempts,
            backoff,
            error,
        )
        self._outstanding += 1  # still owed: drain waits for it
        self._retries.append((time.monotonic() + backoff, out))

    def _resend_due(self, now: float) -> None:
        if not self._retries:
            return
        due = [out for at, out in self._retries if at <= now]
        self._retries = [(at, out) for at, out in self._retries if at > now]
        for out in due:
            self._outstanding -= 1
            self._send(out)

    def _mark_done(self, positions: list[Position]) -> None:
        for where in positions:
            self._records.pop(where, None)
            self.offsets.done(*where)
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
        for where in [w for w in self._records if w[:2] in partitions]:
            del self._records[where]
        self._assignment -= partitions
        log.info("revoked %s (%d waiting users handed over)", sorted(partitions), dropped)

    # -- health ------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        pool = self.pool.health(timeout=2.0)
        detail = {
            "consuming": self.running.is_set(),
            "paused": self._paused,
            "waiting_users": len(self.coalescer),
            "retrying_deliveries": len(self._retries),
            "failure": None if self._failure is None else str(self._failure),
            "pool": pool,
        }
        ok = bool(pool["ok"]) and self.running.is_set() and self._failure is None
        return ok, detail
