"""What both consumers do with a polled Kafka message before reading its payload."""

from __future__ import annotations

import logging

from confluent_kafka import KafkaError, Message

log = logging.getLogger(__name__)


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
