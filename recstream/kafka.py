"""The one place that builds a Kafka producer, so every writer partitions and retries alike.

Every recstream producer is idempotent (a retried send is never written twice) and uses the Java
clients' partitioner (``murmur2_random``), so a user id maps to the same partition whichever
process, library or language produced it: per-user order on the clickstream and on the outputs
relies on that.
"""

from __future__ import annotations

from typing import Any

from confluent_kafka import Producer

from recstream.security import kafka_config
from recstream.settings import CommonSettings

__all__ = ["idempotent_producer"]


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
