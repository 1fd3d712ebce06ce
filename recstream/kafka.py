"""The one place that builds a Kafka producer, so every writer partitions and retries alike, and
the one rule for which client errors are worth asking again.

Every recstream producer is idempotent (a retried send is never written twice) and uses the Java
clients' partitioner (``murmur2_random``), so a user id maps to the same partition whichever
process, library or language produced it: per-user order on the clickstream and on the outputs
relies on that.

A metadata or offsets call may fail for a moment while a partition has no leader (a topic just
created, a broker restarting): :func:`transient` says whether an error is such a one, and
:func:`retrying` asks again until a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer

from recstream.security import kafka_config
from recstream.settings import CommonSettings

__all__ = ["LEADERLESS", "idempotent_producer", "retrying", "transient"]

# Errors of a partition between leaders, or of a broker not answering yet, that librdkafka does
# not flag as retriable.
LEADERLESS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
    }
)
RETRY_PAUSE_S = 0.2
T = TypeVar("T")


def transient(exc: KafkaException) -> bool:
    """Whether a client call that raised ``exc`` may succeed if asked again shortly: an error
    Kafka calls retriable, or one of :data:`LEADERLESS`."""
    error = exc.args[0] if exc.args else None
    return isinstance(error, KafkaError) and (error.retriable() or error.code() in LEADERLESS)


def retrying(call: Callable[[], T], timeout_s: float) -> T:
    """``call()``, asked again while it fails with a :func:`transient` error and ``timeout_s``
    has not passed; the last error is raised."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except KafkaException as exc:
            if not transient(exc) or time.monotonic() + RETRY_PAUSE_S > deadline:
                raise
            time.sleep(RETRY_PAUSE_S)


def idempotent_producer(
    settings: CommonSettings, principal: str | None = None, **overrides: Any
) -> Producer:
    """An idempotent producer with the shared partitioner, connected as ``principal`` (default:
    the settings' own, see ``recstream.security``); ``overrides`` are librdkafka keys with ``_``
    for ``.`` (``linger_ms=20`` sets ``linger.ms``)."""
    config: dict[str, Any] = {
        **kafka_config(settings, principal),
        "enable.idempotence": True,
        "linger.ms": 5,
        "partitioner": "murmur2_random",
    }
    config.update({name.replace("_", "."): value for name, value in overrides.items()})
    return Producer(config)
