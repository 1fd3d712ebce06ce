"""Turn a dataset's interaction log into clickstream events and produce them to Kafka.

Mapping of a rating r (MovieLens: 0.5-5 stars) at time t: a ``view``, a ``click`` and a ``dwell``
of ``dwell_ms = round(r * 24_000)`` (one star = 24 s, five stars = 120 s, the full dwell weight),
all stamped t. An interaction without a value becomes a view and a click; one whose event_type is
already ``view``/``click``/``dwell`` is sent as that event (a dwell's value is its dwell_ms).

Event ids are ``r-`` + 24 hex digits of BLAKE2b over (dataset digests, interaction index, type),
so replaying the same dataset again produces the same ids and changes no profile.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from lab.datasets import Dataset, Interaction
from ops.exceptions import ReplayError
from recstream.settings import CommonSettings
from schemas import SCHEMA_VERSION

MS_PER_STAR = 24_000


def dataset_tag(dataset: Dataset) -> bytes:
    """Identifies the dataset's content, for deterministic event ids."""
    text = "|".join(f"{name}={digest}" for name, digest in sorted(dataset.sha256.items()))
    return (text or dataset.name).encode()


def events_for(index: int, it: Interaction, tag: bytes) -> Iterator[dict[str, Any]]:
    """The clickstream events one interaction becomes."""
    ts = datetime.fromtimestamp(it.ts, UTC).isoformat()

    def event(kind: str, **extra: Any) -> dict[str, Any]:
        digest = hashlib.blake2b(tag + f"|{index}|{kind}".encode(), digest_size=12).hexdigest()
        return {
            "schema_version": SCHEMA_VERSION,
            "event_id": f"r-{digest}",
            "type": kind,
            "user_id": it.user_id,
            "item_id": it.item_id,
            "ts": ts,
            **extra,
        }

    if it.event_type in ("view", "click"):
        yield event(it.event_type)
    elif it.event_type == "dwell":
        yield event("dwell", dwell_ms=max(0, round(it.value or 0)))
    else:
        yield event("view")
        yield event("click")
        if it.value is not None:
            yield event("dwell", dwell_ms=max(0, round(it.value * MS_PER_STAR)))


def replay_records(dataset: Dataset, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
    """``(key, value)`` records in time order; ``limit`` caps the number of events."""
    tag = dataset_tag(dataset)
    sent = 0
    for index, it in enumerate(dataset.interactions):
        for event in events_for(index, it, tag):
            if limit is not None and sent >= limit:
                return
            yield it.user_id.encode(), orjson.dumps(event)
            sent += 1


def count_events(dataset: Dataset, limit: int | None = None) -> int:
    total = sum(
        (3 if it.value is not None else 2) if it.event_type not in ("view", "click", "dwell") else 1
        for it in dataset.interactions
    )
    return total if limit is None else min(limit, total)


def produce(
    settings: CommonSettings,
    topic: str,
    records: Iterator[tuple[bytes, bytes]],
    *,
    rate: float | None = None,
    progress: Callable[[int], None] | None = None,
    timeout_s: float = 60.0,
) -> int:
    """Produce ``records`` (paced to ``rate`` events/s if given) as the clickstream ``producer``
    principal; returns the count delivered."""
    from confluent_kafka import KafkaError

    from recstream.kafka import idempotent_producer

    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(err)

    producer = idempotent_producer(settings, "producer", linger_ms=20, batch_num_messages=10000)
    # Serve delivery callbacks, report progress and pace once per step: about 20 steps a second
    # when paced (so a slow rate is a steady trickle, not bursts), every 1000 events otherwise.
    step = 1000 if rate is None else max(1, min(1000, int(rate / 20)))
    started = time.monotonic()
    sent = 0
    for key, value in records:
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        sent += 1
        if sent % step == 0:
            producer.poll(0)
            if progress is not None:
                progress(step)
            if rate is not None:
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
    remaining = producer.flush(timeout_s)
    if progress is not None:
        progress(sent % step)
    if remaining or failures:
        reason = failures[0] if failures else f"{remaining} records not delivered"
        raise ReplayError(f"producing to {topic!r} failed: {reason}")
    return sent
