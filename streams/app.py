"""The Faust app: one agent folds ``clickstream`` into Redis profiles, batch by batch.

Per batch (``stream.take_events(streams_batch_size, within=streams_batch_within_s)``):

1. every record is validated from its raw bytes (:func:`schemas.parse_event`); a bad one goes to
   ``clickstream.dlq`` with its original key and bytes and headers ``dlq.reason``,
   ``dlq.detail``, ``dlq.source.topic``, ``dlq.source.partition``, ``dlq.source.offset``;
   a record whose key is not its ``user_id`` is dead-lettered too (``key_mismatch``), since
   per-user order relies on the key;
2. the valid events, grouped by user, are folded by one EVALSHA of ``streams/fold.lua``;
3. a ``ProfileChanged`` goes to ``profiles.changed`` for each user with a new item or a category
   mix shift of at least ``profile_shift_threshold``, with header ``recs.origin_ts``: the Kafka
   timestamp (produce time, epoch milliseconds) of the user's newest clickstream record in the
   batch, which the regeneration consumer passes on so the cache writer can measure end-to-end
   freshness;
4. the batch's records are acked once their sends are queued; Faust flushes the producer before
   it commits offsets, so offsets are committed only after the work is durable. A crash replays
   the uncommitted records and the seen-set makes their second fold a no-op.

A timer reports the worker's consumer lag per topic/partition every ``streams_lag_interval_s``
(``recs_consumer_lag_messages``, group = the app id) from the client's cached high watermarks and
read positions, without a broker round trip.

Records of one user share a partition (key = user_id) and a partition is consumed in order, so the
agent works with any number of partitions and worker processes.

With ``streams_delivery = "batch"`` the same handler is fed by the consumer itself, one poll at a
time, instead of by the agent (see ``streams/consumer.py``); everything above still holds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any

import faust
import orjson
from aiokafka.errors import IllegalStateError  # type: ignore[import-untyped]  # no stubs
from faust.exceptions import ConsumerNotStarted
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas import Reason, ValidationFailed, parse_event
from streams import metrics
from streams.exceptions import StoreUnavailable
from streams.fold import Folded, FoldParams, FoldScript, Weights, group_by_user, to_datetime
from streams.metrics import ORIGIN_HEADER
from streams.settings import StreamsSettings

log = logging.getLogger(__name__)

EXIT_STORE_UNAVAILABLE = 70  # EX_SOFTWARE: the worker cannot make progress

BatchHook = Callable[[int, Sequence[float], Sequence[Folded]], None]
"""Called after each batch with (records, per-event latencies in seconds, per-user results)."""


class ProfileFolder:
    """Validates, dead-letters, folds and announces one batch of clickstream records."""

    def __init__(
        self,
        settings: StreamsSettings,
        redis: Redis,
        send_dlq: Callable[..., Awaitable[Any]],
        send_changed: Callable[..., Awaitable[Any]],
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

    async def handle(self, records: Sequence[Any]) -> None:
        """Process one batch of Kafka records (Faust ``Message`` objects); effects are queued.

        Calls may overlap (batch delivery validates the next poll while Redis folds the
        previous one); folds and announcements still happen in call order.
        """
        previous, mine = self._last_fold, asyncio.get_running_loop().create_future()
        self._last_fold = mine
        try:
            await self._handle(records, previous)
        finally:
            mine.set_result(None)

    async def _handle(self, records: Sequence[Any], previous: asyncio.Future[None] | None) -> None:
        started = time.monotonic()
        valid: list[tuple[str, str, str, float, float]] = []
        # Per user, the Kafka timestamp of its newest record (records of a user come in order).
        produced: dict[str, float | None] = {}
        weight_of = self.weights.of
        topic = ""
        for message in records:
            topic = message.topic
            try:
                event = parse_event(message.value, max_future=self.max_future)
                if message.key != event.user_id.encode():
                    raise ValidationFailed(
                        Reason.KEY_MISMATCH, "record key must equal the event's user_id"
                    )
            except ValidationFailed as failure:
                await self._dead_letter(message, failure)
                continue
            produced[event.user_id] = message.timestamp
            valid.append(
                (
                    event.user_id,
                    event.event_id,
                    event.item_id,
                    event.ts.timestamp(),
                    weight_of(event),
                )
            )
        metrics.EVENTS_IN.labels(topic).inc(len(records))
        if previous is not None:
            await previous
        folded = await self._fold(group_by_user(valid))
        announced = 0
        for result in folded:
            if result.emit:
                await self._announce(result, produced.get(result.user_id))
                announced += 1
        if announced:
            self._out_changed.inc(announced)
        done = time.monotonic()
        latencies = [done - (m.time_in or started) for m in records]
        metrics.observe_many(metrics.FOLD_SECONDS, latencies)
        metrics.BATCH_SIZE.observe(len(records))
        for hook in self.hooks:
            hook(len(records), latencies, folded)

    async def _dead_letter(self, message: Any, failure: ValidationFailed) -> Any:
        metrics.DEAD_LETTERED.labels(failure.reason.value).inc()
        self._out_dlq.inc()
        headers = [
            ("dlq.reason", failure.reason.value.encode()),
            ("dlq.detail", failure.detail.encode("utf-8", "replace")[:512]),
            ("dlq.source.topic", message.topic.encode()),
            ("dlq.source.partition", str(message.partition).encode()),
            ("dlq.source.offset", str(message.offset).encode()),
        ]
        return await self._send_dlq(key=message.key, value=message.value, headers=headers)

    async def _announce(self, result: Folded, produced: float | None) -> Any:
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
        headers = None if produced is None else [(ORIGIN_HEADER, b"%d" % round(produced * 1000))]
        return await self._send_changed(
            key=result.user_id.encode(), value=orjson.dumps(change), headers=headers
        )

    async def _fold(self, groups: dict[str, list[tuple[str, str, float, float]]]) -> list[Folded]:
        """Run the fold script, retrying while Redis is briefly unreachable."""
        deadline = time.monotonic() + self.settings.streams_redis_retry_s
        delay = 0.1
        while True:
            try:
                results = await self.script.run(groups)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"Redis unreachable for {self.settings.streams_redis_retry_s:.0f}s: {exc}"
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


def build_app(settings: StreamsSettings) -> tuple[faust.App, ProfileFolder]:
    """The Faust app with its fold agent, configured from ``settings``."""
    datadir = settings.streams_datadir / settings.streams_app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.streams_app_id,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        autodiscover=False,
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=settings.streams_web_port > 0,
        web_port=settings.streams_web_port or 6066,
        topic_disable_leader=True,
        topic_partitions=settings.topic_partitions,
        consumer_auto_offset_reset="earliest",
        broker_commit_every=settings.streams_batch_size,
        broker_session_timeout=settings.streams_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.streams_session_timeout_s / 3),
        broker_commit_interval=1.0,
        stream_buffer_maxsize=max(4096, 2 * settings.streams_batch_size),
        producer_linger_ms=5,
        broker_max_poll_records=settings.streams_batch_size,
        Monitor="streams.sensors:LeanMonitor" if settings.streams_lean_monitor else None,
        datadir=str(datadir),
    )

    def raw_topic(name: str) -> faust.TopicT:
        return app.topic(
            name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
        )

    source = raw_topic(settings.topic_clickstream)
    dlq = raw_topic(settings.topic_dlq)
    changed = raw_topic(settings.topic_profiles_changed)
    redis = Redis.from_url(settings.redis_url.get_secret_value())

    async def send_dlq(**kwargs: Any) -> Any:
        return await dlq.send(**kwargs)

    async def send_changed(**kwargs: Any) -> Any:
        return await changed.send(**kwargs)

    folder = ProfileFolder(settings, redis, send_dlq, send_changed)

    async def fold(messages: Sequence[Any]) -> None:
        try:
            await folder.handle(messages)
        except StoreUnavailable as exc:
            # Faust acks a batch even when its handler fails, and a graceful stop commits
            # acked offsets: that would drop this batch. Exiting at once leaves it uncommitted,
            # so the next worker folds it (the failure surfaces, nothing is lost).
            log.critical("stopping without committing: %s", exc)
            os._exit(EXIT_STORE_UNAVAILABLE)

    if settings.streams_delivery == "batch":
        from streams.consumer import FastDrainConsumer

        # The consumer hands each poll's clickstream records to `fold` itself; the topic is
        # registered with the conductor so that the consumer subscribes to it.
        consumer_cls = FastDrainConsumer.with_batches({source.get_topic_name()}, fold)
        app.transport.Consumer = consumer_cls  # type: ignore[misc]  # ClassVar, on purpose
        app.topics.add(source)
    else:
        if settings.streams_fast_drain:
            from streams.consumer import FastDrainConsumer

            # An instance attribute shadows the transport's Consumer class for this app only.
            app.transport.Consumer = FastDrainConsumer  # type: ignore[misc]  # ClassVar, on purpose

        @app.agent(source, name="fold-profiles")
        async def fold_profiles(stream: Any) -> None:
            # Any: faust's StreamT stub lacks take_events (faust-streaming 0.15 has it on Stream).
            async for records in stream.take_events(
                settings.streams_batch_size, within=settings.streams_batch_within_s
            ):
                await fold([record.message for record in records])

    @app.task  # type: ignore[untyped-decorator]  # faust's decorator is untyped
    async def warm_up() -> None:
        try:
            await folder.script.load()
        except (RedisConnectionError, RedisTimeoutError) as exc:
            log.warning("Redis not reachable yet (%s); the first batch will retry", exc)
        if settings.streams_metrics_port:
            from prometheus_client import start_http_server

            start_http_server(settings.streams_metrics_port)
            log.info("metrics on :%d/metrics", settings.streams_metrics_port)

    @app.timer(interval=settings.streams_lag_interval_s)  # type: ignore[untyped-decorator]
    async def report_lag() -> None:
        await observe_lag(app.consumer, settings.streams_app_id)

    @app.on_before_shutdown.connect
    async def close_redis(sender: Any, /, *_: Any, signal: Any, **__: Any) -> None:
        await redis.aclose()

    return app, folder


async def observe_lag(consumer: Any, group: str) -> int:
    """Report the lag of every partition assigned to a Faust ``consumer``; returns how many.

    The position is the offset after the last record handed to the application (so records
    fetched but not yet delivered count as lag, like librdkafka's ``consumer_lag``), or the
    client's fetch position before the first record. The high watermark is the one the client
    cached from its last fetch, so no broker request is made.
    """
    try:
        assigned = consumer.assignment()
    except ConsumerNotStarted:
        return 0
    rows: list[tuple[str, int, int | None, int | None]] = []
    for tp in sorted(assigned):
        last = consumer._read_offset.get(tp)
        position: int | None = last + 1 if last is not None else None
        if position is None:
            try:
                position = await consumer.position(tp)
            except IllegalStateError:  # revoked meanwhile
                continue
        rows.append((tp.topic, tp.partition, consumer.highwater(tp), position))
    return metrics.record_lag(group, rows)
