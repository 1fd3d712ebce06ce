"""The fold of one batch of clickstream records, as plain code that every reader feeds.

:class:`ProfileFolder` takes a batch of :class:`schemas.Envelope` records (raw key and value bytes
beside their topic, partition, offset, headers and Kafka timestamp) and:

1. validates every record from its raw bytes (:func:`schemas.parse_event`); a bad one goes to
   the dead-letter sender with its original key and bytes and headers ``dlq.reason``,
   ``dlq.detail``, ``dlq.source.topic``, ``dlq.source.partition``, ``dlq.source.offset``; a record
   whose key is not its ``user_id`` is dead-lettered too (``key_mismatch``), since per-user order
   relies on the key;
2. folds the valid events, grouped by user, with one EVALSHA of ``streams/fold.lua``;
3. sends a ``ProfileChanged`` for each user with a new item or a category mix shift of at least
   ``profile_shift_threshold``, with header ``recs.origin_ts``: the Kafka timestamp (epoch
   milliseconds) of the user's newest record in the batch, which the regeneration consumer passes
   on so the cache writer can measure end-to-end freshness.

It imports no Kafka client: the Faust agent and batch delivery (``streams/app.py``), the
rebuild's confluent-kafka reader (``ops/rebuild.py``) and tests are thin adapters that turn their
records into envelopes and give it two senders. Effects are only *queued* when :meth:`handle`
returns; the adapter acks or checkpoints the batch after that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from recstream.metrics import count
from schemas import Envelope, Reason, ValidationFailed, parse_event
from schemas.deadletter import dead_letter_headers
from streams import metrics
from streams.exceptions import StoreUnavailable
from streams.fold import Folded, FoldParams, FoldScript, Weights, group_by_user, to_datetime
from streams.metrics import ORIGIN_HEADER
from streams.settings import StreamsSettings

__all__ = ["BatchHook", "ProfileFolder", "Send"]

log = logging.getLogger(__name__)

SERVICE = "streams"
"""The service label of ``recs_records_total`` (``in = folded + duplicate + dead_lettered``)."""

# Dead-letter reasons of records refused before or by the store (the contract's own reasons
# are schemas.Reason, for values that fail validation).
TOMBSTONE = "tombstone"
MISSING_KEY = "missing_key"
STORE_REJECTED = "store_rejected"

# Redis replies that say "not now" rather than "never": out of memory under noeviction, loading
# its data set, a replica without its master or promoted meanwhile, a cluster slot migrating or
# down, busy with a script. They are retried like an unreachable Redis; any other reply is a
# refusal of the data itself. (redis-py turns the known prefixes into classes and strips them.)
TRANSIENT_ERRORS = (
    OutOfMemoryError,
    ReadOnlyError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
)
TRANSIENT_PREFIXES = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM")


def transient(exc: ResponseError) -> bool:
    """Whether a Redis refusal is a passing state of the server (retry) rather than of the data."""
    return isinstance(exc, TRANSIENT_ERRORS) or str(exc).startswith(TRANSIENT_PREFIXES)


def reply_class(exc: ResponseError) -> str:
    """The class of a Redis refusal (``WRONGTYPE``, ``NoPermissionError``…), never its message."""
    if type(exc) is not ResponseError:
        return type(exc).__name__
    head = str(exc).split(" ", 1)[0]
    return head if head.isalpha() and head.isupper() else "ResponseError"


BatchHook = Callable[[int, Sequence[float], Sequence[Folded]], None]
"""Called after each batch with (records, per-event latencies in seconds, per-user results)."""


class Send(Protocol):
    """Queues one record for a topic (the dead-letter topic or ``profiles.changed``)."""

    def __call__(
        self, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
    ) -> Awaitable[object]: ...


class ProfileFolder:
    """Validates, dead-letters, folds and announces one batch of clickstream records."""

    def __init__(
        self,
        settings: StreamsSettings,
        redis: Redis,
        send_dlq: Send,
        send_changed: Send,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.script = FoldScript(redis, settings.key_prefix, FoldParams.from_settings(settings))
        self.weights = Weights.from_settings(settings)
        self.max_future = timedelta(seconds=settings.event_max_future_s)
        self._send_dlq = send_dlq
        self._send_changed = send_changed
        self._out_changed = metrics.EVENTS_OUT.labels(settings.topic_profiles_changed)
        self._out_dlq = metrics.EVENTS_OUT.labels(settings.topic_dlq)
        self.hooks: list[BatchHook] = []
        # Completion of the latest batch's fold: batches may be validated concurrently, but
        # they are folded and announced strictly in the order handle() was called.
        self._last_fold: asyncio.Future[None] | None = None

    async def handle(
        self, records: Sequence[Envelope], arrived: Sequence[float | None] | None = None
    ) -> None:
        """Process one batch of records; effects are queued when it returns.

        ``arrived`` is each record's arrival time in the reader (``time.monotonic()``), for the
        per-event fold latency; records without one count from the start of this call.
        Calls may overlap (batch delivery validates the next poll while Redis folds the
        previous one); folds and announcements still happen in call order.
        """
        previous, mine = self._last_fold, asyncio.get_running_loop().create_future()
        self._last_fold = mine
        try:
            await self._handle(records, arrived, previous)
        finally:
            mine.set_result(None)

    async def _handle(
        self,
        records: Sequence[Envelope],
        arrived: Sequence[float | None] | None,
        previous: asyncio.Future[None] | None,
    ) -> None:
        started = time.monotonic()
        valid: list[tuple[str, str, str, float, float]] = []
        valid_records: list[Envelope] = []
        # Per user, the Kafka timestamp of its newest record (records of a user come in order).
        produced: dict[str, int | None] = {}
        weight_of = self.weights.of
        topic = records[0].topic if records else ""
        dead = 0
        # Everything is checked here, before anything reaches Redis: a record the fold could
        # not finish (a ts before 1970 has no datetime for its change notice) is refused whole.
        for record in records:
            try:
                if record.value is None:
                    raise _Refused(TOMBSTONE, "null value (tombstone)")
                event = parse_event(record.value, max_future=self.max_future)
                if record.key is None:
                    raise _Refused(MISSING_KEY, "record has no key; it must be the user_id")
                if record.key != event.user_id.encode():
                    raise ValidationFailed(
                        Reason.KEY_MISMATCH, "record key must equal the event's user_id"
                    )
                ts = event.ts.timestamp()
                if ts < 0:
                    detail = f"ts {event.ts.isoformat()} is before 1970"
                    raise ValidationFailed(Reason.BAD_TS, detail)
            except ValidationFailed as failure:
                await self._dead_letter(record, failure.reason.value, failure.detail)
                dead += 1
                continue
            except _Refused as early:
                await self._dead_letter(record, early.reason, early.detail)
                dead += 1
                continue
            stamp = record.timestamp_ms
            produced[event.user_id] = stamp if type(stamp) is int and stamp >= 0 else None
            valid.append((event.user_id, event.event_id, event.item_id, ts, weight_of(event)))
            valid_records.append(record)
        metrics.EVENTS_IN.labels(topic).inc(len(records))
        if previous is not None:
            await previous
        folded = await self._fold(group_by_user(valid))
        refused = {r.user_id: r.rejected for r in folded if r.rejected}
        if refused:
            for (user, *_), record in zip(valid, valid_records, strict=True):
                if user in refused:
                    detail = f"Redis refused the user's keys: {refused[user]}"
                    await self._dead_letter(record, STORE_REJECTED, detail)
                    dead += 1
        # Counted together once every record has its outcome, so in = folded + duplicate +
        # dead_lettered holds whenever no batch is inside this method.
        count(SERVICE, topic, "in", len(records))
        count(SERVICE, topic, "dead_lettered", dead)
        count(SERVICE, topic, "folded", sum(r.folded for r in folded))
        count(SERVICE, topic, "duplicate", sum(r.duplicates + r.late for r in folded))
        announced = 0
        for result in folded:
            if result.emit:
                await self._announce(result, produced.get(result.user_id))
                announced += 1
        if announced:
            self._out_changed.inc(announced)
        done = time.monotonic()
        if arrived is None:
            latencies = [done - started] * len(records)
        else:
            latencies = [done - (t or started) for t in arrived]
        metrics.observe_many(metrics.FOLD_SECONDS, latencies)
        metrics.BATCH_SIZE.observe(len(records))
        for hook in self.hooks:
            hook(len(records), latencies, folded)

    async def _dead_letter(self, record: Envelope, reason: str, detail: str) -> object:
        metrics.DEAD_LETTERED.labels(reason).inc()
        self._out_dlq.inc()
        headers = dead_letter_headers(record, reason, detail)
        # A tombstone has no bytes: its dead letter is empty, and its reason says why.
        value = b"" if record.value is None else record.value
        return await self._send_dlq(key=record.key, value=value, headers=headers)

    async def _announce(self, result: Folded, produced_ms: int | None) -> object:
        # Built as a plain dict (a ProfileChanged in JSON form; a unit test holds it to the
        # model): validating a model per change costs more than the fold of its events.
        change = {
            "schema_version": 1,
            "user_id": result.user_id,
            "profile_version": result.version,
            "changes": {
                "new_items": list(result.new_items),
                "affinity_shift": min(result.shift, 1.0),
                "events": result.folded,
            },
            "event_id": result.trigger_event_id,
            "trigger_ts": to_datetime(result.trigger_ts).isoformat(),
        }
        metrics.PROFILE_CHANGES.inc()
        headers = None if produced_ms is None else [(ORIGIN_HEADER, b"%d" % produced_ms)]
        return await self._send_changed(
            key=result.user_id.encode(), value=orjson.dumps(change), headers=headers
        )

    async def _fold(self, groups: dict[str, list[tuple[str, str, float, float]]]) -> list[Folded]:
        """Run the fold script; retry while Redis is briefly unavailable, isolate refused users.

        An unreachable Redis or a transient refusal (:func:`transient`) is retried with
        backoff for ``streams_redis_retry_s``, then raises :class:`StoreUnavailable`: the worker
        stops without acking, so the batch comes again. Any other refusal concerns the data: the
        batch is folded user by user, and the users Redis still refuses come back as
        :meth:`Folded.refused` (their records are dead-lettered), the others fold.
        """
        deadline = time.monotonic() + self.settings.streams_redis_retry_s
        delay = 0.1
        while True:
            try:
                results = await self.script.run(groups)
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                if isinstance(exc, ResponseError) and not transient(exc):
                    results = await self._fold_each(groups)
                    break
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"Redis unavailable for {self.settings.streams_redis_retry_s:.0f}s: "
                        f"{reply_class(exc) if isinstance(exc, ResponseError) else exc}"
                    ) from exc
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            break
        for result in results:
            metrics.FOLDED.inc(result.folded)
            if result.duplicates:
                metrics.IGNORED.labels("duplicate").inc(result.duplicates)
            if result.late:
                metrics.IGNORED.labels("too_late").inc(result.late)
        return results

    async def _fold_each(
        self, groups: dict[str, list[tuple[str, str, float, float]]]
    ) -> list[Folded]:
        """Fold each user alone, so one user's refused data cannot hold back the others'.

        A transient or connection error here propagates to :meth:`_fold`'s caller unretried
        (StoreUnavailable semantics are kept by re-raising it as such).
        """
        results: list[Folded] = []
        for user, events in groups.items():
            try:
                results.extend(await self.script.run({user: events}))
            except ResponseError as exc:
                if transient(exc):
                    raise StoreUnavailable(f"Redis unavailable: {reply_class(exc)}") from exc
                log.error("Redis refused user %r's fold: %s", user, reply_class(exc))
                results.append(Folded.refused(user, reply_class(exc)))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        return results


class _Refused(Exception):  # noqa: N818 - a signal inside the validation loop, never raised out
    """A record refused before validation of its value could start (no value, no key)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
