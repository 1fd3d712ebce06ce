"""A paced replay is a steady trickle, not bursts: record timestamps spread over the run."""

from __future__ import annotations

import pytest
from confluent_kafka import Consumer

from ops.feed import produce
from recstream.security import kafka_config
from tests.conftest import Namespace

pytestmark = pytest.mark.integration


def test_paced_replay_spreads_records_over_time(ns: Namespace) -> None:
    topic = ns.settings.topic_clickstream
    records = ((f"u{i % 3}".encode(), b'{"n": %d}' % i) for i in range(60))
    assert produce(ns.settings, topic, records, rate=60.0) == 60

    consumer = Consumer(
        {
            **kafka_config(ns.settings),
            "group.id": ns.group("pacing"),
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    stamps: list[int] = []
    try:
        for _ in range(200):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                stamps.append(msg.timestamp()[1])
            if len(stamps) == 60:
                break
    finally:
        consumer.close()
    assert len(stamps) == 60
    stamps.sort()
    # 60 events at 60/s take about a second; bursts of the whole run would span a few ms.
    assert stamps[-1] - stamps[0] >= 700
    # No quarter of a second holds more than half the records.
    assert max(sum(1 for t in stamps if s <= t < s + 250) for s in stamps) <= 30
