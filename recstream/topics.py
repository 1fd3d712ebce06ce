"""Creating and deleting Kafka topics, for the local stack, the operator tools and the tests.

The stack creates the pipeline's topics at `stack up`, `recstream replay regen` creates its output
topic, and tests and benchmarks make and remove their own; all of them go through these two
functions, which wait for the broker's answer (a request left pending dies with its client).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from recstream.errors import RecstreamError
from recstream.security import kafka_config
from recstream.settings import CommonSettings

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient

__all__ = ["TopicError", "create_topics", "delete_topics"]


class TopicError(RecstreamError):
    """The broker refused to create or delete a topic."""


def create_topics(
    settings: CommonSettings,
    topics: list[str],
    partitions: int,
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created (as the settings'
    principal, an operator's ``admin`` unless a service's settings are given).

    ``configs`` (topic -> Kafka topic configs, e.g. ``CommonSettings.topic_configs``: retention,
    compaction) are given to the topics created and set on those of ``topics`` that exist
    already, so an older stack gets them too.
    """
    from confluent_kafka.admin import AdminClient, NewTopic

    configs = configs or {}
    admin = AdminClient(kafka_config(settings))
    existing = set(admin.list_topics(timeout=10.0).topics)
    missing = [t for t in topics if t not in existing]
    _set_configs(admin, {t: configs[t] for t in topics if t in existing and t in configs})
    if not missing:
        return []
    futures = admin.create_topics(
        [
            NewTopic(
                t, num_partitions=partitions, replication_factor=1, config=dict(configs.get(t, {}))
            )
            for t in missing
        ]
    )
    there: list[str] = []
    for name, fut in futures.items():
        try:
            fut.result(timeout=30.0)
        except Exception as exc:  # a concurrent creator is fine, others are not
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise TopicError(f"cannot create topic {name!r}: {exc}") from exc
            there.append(name)  # created meanwhile, or listed late: without our configs
    _set_configs(admin, {t: configs[t] for t in there if t in configs})
    return [t for t in missing if t not in there]


def _set_configs(admin: AdminClient, configs: Mapping[str, Mapping[str, str]]) -> None:
    """Set (incrementally: other configs stay) each topic's ``configs``."""
    from confluent_kafka.admin import (
        AlterConfigOpType,
        ConfigEntry,
        ConfigResource,
        ResourceType,
    )

    if not configs:
        return
    resources = [
        ConfigResource(
            ResourceType.TOPIC,
            topic,
            incremental_configs=[
                ConfigEntry(name, value, incremental_operation=AlterConfigOpType.SET)
                for name, value in entries.items()
            ],
        )
        for topic, entries in configs.items()
    ]
    for resource, fut in admin.incremental_alter_configs(resources).items():
        try:
            fut.result(timeout=30.0)
        except Exception as exc:
            raise TopicError(f"cannot configure topic {resource.name!r}: {exc}") from exc


def delete_topics(settings: CommonSettings, topics: list[str]) -> None:
    """Delete ``topics`` and wait for the broker to confirm; absent ones are fine."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(kafka_config(settings))
    futures = admin.delete_topics(topics, operation_timeout=30)
    for name, fut in futures.items():
        try:
            fut.result(timeout=60.0)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise TopicError(f"cannot delete topic {name!r}: {exc}") from exc
