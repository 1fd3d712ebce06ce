"""The Faust app: one agent folds ``clickstream`` into Redis profiles, batch by batch.

Per batch (``stream.take_events(streams_batch_size, within=streams_batch_within_s)``) the agent
turns Faust's messages into :class:`schemas.Envelope` records and hands them to
:class:`streams.folder.ProfileFolder`, which validates, dead-letters to ``clickstream.dlq``, folds
into Redis and announces changes on ``profiles.changed`` (see there). The batch's records are
acked once those sends are queued; Faust flushes the producer before it commits offsets, so
offsets are committed only after the work is durable. A crash replays the uncommitted records and
the seen-set makes their second fold a no-op.

The fold also stores, in the same script, each partition's next offset and the change notices it
decided (pending until Kafka has them). On every assignment the consumer resumes each partition
from the offset in Redis rather than Kafka's commit, re-feeding what a Redis that came back older
(or empty) lacks, and announces the pending notices again (``ProfileFolder.resume``).

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
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import faust
from aiokafka.errors import IllegalStateError  # type: ignore[import-untyped]  # no stubs
from faust.exceptions import ConsumerNotStarted
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from recstream.security import KAFKA_MECHANISM, async_redis_client, credentials, kafka_config
from schemas import Envelope
from streams import metrics
from streams.erasure import read_erasures
from streams.exceptions import StoreUnavailable
from streams.folder import ProfileFolder
from streams.settings import StreamsSettings

log = logging.getLogger(__name__)

EXIT_STORE_UNAVAILABLE = 70  # EX_SOFTWARE: the worker cannot make progress


def envelopes(messages: Sequence[Any]) -> list[Envelope]:
    """Faust ``Message`` objects as the fold's envelopes (Faust keeps timestamps in seconds)."""
    # One comprehension, no call per record: this runs for every clickstream record.
    return [
        Envelope(
            m.topic,
            m.partition,
            m.offset,
            m.key,
            m.value,
            tuple(m.headers) if m.headers else (),
            None if m.timestamp is None else round(m.timestamp * 1000),
        )
        for m in messages
    ]


def broker_credentials(settings: StreamsSettings) -> faust.SASLCredentials | None:
    """The worker's SASL/SCRAM credentials for Faust's clients, when the settings give some."""
    found = credentials(settings, "kafka")
    if found is None:
        return None
    return faust.SASLCredentials(
        username=found.username,
        password=found.password.get_secret_value(),
        mechanism=KAFKA_MECHANISM,
    )


def build_app(settings: StreamsSettings) -> tuple[faust.App, ProfileFolder]:
    """The Faust app with its fold agent, configured from ``settings``."""
    datadir = settings.streams_datadir / settings.streams_app_id
    datadir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.streams_app_id,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        broker_credentials=broker_credentials(settings),
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
        consumer_group_instance_id=settings.group_instance_id or None,
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
    redis = async_redis_client(settings)

    async def send_dlq(
        *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
    ) -> object:
        return await dlq.send(key=key, value=value, headers=headers)

    async def send_changed(
        *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
    ) -> object:
        return await changed.send(key=key, value=value, headers=headers)

    async def erasures() -> dict[str, dict[str, int]]:
        # The compacted users.erased, read whole at each assignment (a blocking client: off the
        # loop); its watermarks back up the markers in Redis (streams.erasure).
        found = await asyncio.get_running_loop().run_in_executor(
            None,
            partial(
                read_erasures,
                kafka_config(settings),
                settings.topic_users_erased,
                # Under the worker's own prefix, where its principal may name groups.
                group=f"{settings.streams_app_id}-erasures",
            ),
        )
        return {user: record.fields() for user, record in found.items()}

    folder = ProfileFolder(
        settings,
        redis,
        send_dlq,
        send_changed,
        group=settings.streams_app_id,
        erasures=erasures,
    )

    async def fold(messages: Sequence[Any]) -> None:
        # The Faust adapter: envelopes for the fold, the monitor's arrival stamps for latency.
        try:
            await folder.handle(envelopes(messages), [m.time_in for m in messages])
        except StoreUnavailable as exc:
            # Faust acks a batch even when its handler fails, and a graceful stop commits
            # acked offsets: that would drop this batch. Exiting at once leaves it uncommitted,
            # so the next worker folds it (the failure surfaces, nothing is lost).
            log.critical("stopping without committing: %s", exc)
            os._exit(EXIT_STORE_UNAVAILABLE)

    async def resume(committed: Mapping[tuple[str, int], int | None]) -> Mapping[Any, int | None]:
        try:
            return await folder.resume(committed)
        except StoreUnavailable as exc:
            # Consuming from Kafka's commits instead could skip what Redis lacks: stop instead.
            log.critical("stopping without committing: cannot resume: %s", exc)
            os._exit(EXIT_STORE_UNAVAILABLE)

    from streams.consumer import FastDrainConsumer, ResumingConsumer

    consumer_cls: type[ResumingConsumer] = ResumingConsumer
    if settings.streams_delivery == "batch":
        # The consumer hands each poll's clickstream records to `fold` itself; the topic is
        # registered with the conductor so that the consumer subscribes to it.
        consumer_cls = FastDrainConsumer.with_batches({source.get_topic_name()}, fold)
        app.topics.add(source)
    elif settings.streams_fast_drain:
        consumer_cls = FastDrainConsumer
    # An instance attribute shadows the transport's Consumer class for this app only.
    app.transport.Consumer = consumer_cls.resuming(resume)  # type: ignore[misc]  # ClassVar, on purpose

    if settings.streams_delivery != "batch":

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

    @app.timer(interval=settings.streams_progress_check_s)  # type: ignore[untyped-decorator]
    async def check_progress() -> None:
        try:
            await folder.check_progress()
        except StoreUnavailable as exc:
            log.critical("stopping without committing: %s", exc)
            os._exit(EXIT_STORE_UNAVAILABLE)

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
