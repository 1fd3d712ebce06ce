"""What both consumers share about Kafka: their client settings and reading a polled message."""

from __future__ import annotations

import logging
from functools import partial

from confluent_kafka import Consumer, KafkaError, KafkaException, Message

from consumers.metrics import record_lag
from recstream.security import kafka_config
from recstream.settings import CommonSettings

log = logging.getLogger(__name__)


def at_least_once_consumer(
    settings: CommonSettings, group: str, stats_interval_ms: int, instance_id: str = ""
) -> Consumer:
    """A consumer whose offsets are stored by the caller after the work is done, connected as
    the settings' principal.

    Cooperative rebalancing; offsets are stored explicitly (``store_offsets``) and committed in
    the background; consumer lag per partition comes from librdkafka's statistics. A non-empty
    ``instance_id`` makes the member static (``group.instance.id``): restarted under the same id,
    it gets its partitions back without waiting for the group to drop its dead predecessor.
    """
    static = {"group.instance.id": instance_id} if instance_id else {}
    return Consumer(
        {
            **kafka_config(settings),
            **static,
            "group.id": group,
            "partition.assignment.strategy": "cooperative-sticky",
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 1000,
            "auto.offset.reset": "earliest",
            "statistics.interval.ms": stats_interval_ms,
            "stats_cb": partial(record_lag, group),
        }
    )


def commit_stored(consumer: Consumer) -> None:
    """Commit the stored offsets now (on revoke and on close); nothing stored is not an error."""
    try:
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            log.warning("commit failed: %s", exc)


def position(message: Message) -> tuple[str, int, int] | None:
    """``(topic, partition, offset)`` of a data message; ``None`` (logged) for an error event.

    End-of-partition events are expected and not logged.
    """
    error = message.error()
    if error is not None:
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("consumer error: %s", error)
        return None
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset
