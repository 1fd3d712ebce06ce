"""``POST /v1/events`` on the real Kafka and Redis: what the API produces, where, and that the
stream worker folds it (once, however often it is posted).

Every answer is checked against the OpenAPI document the API serves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from api.app import served_openapi
from api.keys import add_key, new_key
from api.settings import ApiSettings
from recstream.security import kafka_config
from schemas.api import ErrorResponse, EventsAccepted, EventsRejected, InvalidEvent, Scope
from schemas.exceptions import Reason
from schemas.openapi import EVENTS_PATH
from tests.api_contract import assert_conforms, exchange
from tests.conftest import Namespace
from tests.integration.streams_support import (
    Worker,
    consume,
    counts,
    event,
    load_test_catalog,
    produce,
    wait_for,
)

pytestmark = pytest.mark.integration

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def _api(ns: Namespace, tmp_path: Path, **changes: Any) -> tuple[ApiSettings, dict[str, str]]:
    path = tmp_path / "keys"
    made = {}
    for scope in (Scope.EVENTS, Scope.READ):
        key, record = new_key([scope], f"web-{scope.value}")
        add_key(path, record)
        made[scope.value] = key
    settings = ApiSettings(**ns.settings.model_dump(), api_keys_file=path, **changes)
    return settings, made


async def _posts(settings: ApiSettings, calls: list[tuple[bytes, dict[str, str]]]) -> list[Any]:
    answers = await exchange(settings, [("POST", EVENTS_PATH, h, body) for body, h in calls])
    return [(status, body) for status, _, body in answers]


def _records_on(settings: ApiSettings, topic: str) -> int:
    """How many records ``topic`` holds (its partitions' high watermarks added up)."""
    consumer = Consumer({**kafka_config(settings), "group.id": f"count-{topic}"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in partitions
        )
    finally:
        consumer.close()


def test_an_events_key_produces_a_batch_keyed_by_user_and_nothing_invalid(
    ns: Namespace, tmp_path: Path
) -> None:
    settings, keys = _api(ns, tmp_path, api_max_body_bytes=64 * 1024, api_events_max_batch=50)
    events = {"X-API-Key": keys["events"]}
    users = ["alice", "bob", "carol ü", "a*b"]
    batch = [event(f"e-{n}", users[n % 4], "abcde"[n % 5], T0 + n, "view") for n in range(12)]
    single = event("e-single", "alice", "c", T0 + 20, "dwell", dwell_ms=3000)
    mixed = [batch[0], {**batch[1], "type": "purchase"}, batch[2]]
    calls = [
        (orjson.dumps({"events": batch}), {}),
        (orjson.dumps({"events": batch}), {"X-API-Key": keys["read"]}),
        (orjson.dumps({"events": mixed}), events),
        (b'{"events": [' + b" " * (64 * 1024) + b"]}", events),
        (orjson.dumps({"events": [batch[0]] * 51}), events),
        (orjson.dumps({"events": batch}), events),
        (orjson.dumps(single), events),
    ]
    results = asyncio.run(_posts(settings, calls))
    assert [status for status, _ in results] == [401, 403, 400, 413, 400, 202, 202], results
    document = served_openapi(settings)
    for status, body in results:
        assert_conforms(document, EVENTS_PATH, status, body, method="post")
        for user in users:
            assert user.encode() not in body
    rejected = EventsRejected.model_validate_json(results[2][1])
    assert rejected.invalid == (InvalidEvent(index=1, reason=Reason.UNKNOWN_TYPE),)
    assert ErrorResponse.model_validate_json(results[3][1]).error.code == "body_too_large"
    assert ErrorResponse.model_validate_json(results[4][1]).error.code == "too_many_events"
    assert EventsAccepted.model_validate_json(results[5][1]).accepted == 12
    assert EventsAccepted.model_validate_json(results[6][1]).accepted == 1

    topic = settings.topic_clickstream
    sent = [*batch, single]
    records = consume(topic, settings, lambda got: len(got) >= len(sent))
    # The API answered 202 only after the broker's acks, and the refused requests produced
    # nothing: the topic holds exactly the accepted events, each keyed by its user id.
    assert _records_on(settings, topic) == len(sent)
    assert sorted((r.key, r.value) for r in records) == sorted(
        (e["user_id"].encode(), orjson.dumps(e)) for e in sent
    )
    # Each user's events share the partition any other recstream producer gives that key.
    produce(
        settings.model_copy(update={"topic_clickstream": settings.topic_dlq}),
        [(user.encode(), b"probe") for user in users],
    )
    probes = consume(settings.topic_dlq, settings, lambda got: len(got) >= len(users))
    partition_of = {r.key: r.partition for r in probes}
    assert {(r.key, r.partition) for r in records} == {
        (user.encode(), partition_of[user.encode()]) for user in users
    }


def test_posted_events_are_folded_once_however_often_they_are_posted(
    ns: Namespace, tmp_path: Path, workers: Callable[..., Worker]
) -> None:
    load_test_catalog(ns.settings)
    settings, keys = _api(ns, tmp_path)
    events = {"X-API-Key": keys["events"]}
    users = ["u1", "u2", "u3"]
    batch = [event(f"e-{n}", users[n % 3], "abcde"[n % 5], T0 + n, "click") for n in range(9)]
    # Posted after the batch and its repeat, on each user's partition: once these are folded,
    # so are the repeats before them.
    last = [event(f"last-{u}", u, "e", T0 + 100, "view") for u in users]
    workers()
    results = asyncio.run(
        _posts(
            settings,
            [
                (orjson.dumps({"events": batch}), events),
                (orjson.dumps({"events": batch}), events),  # a client's retry: same event ids
                (orjson.dumps({"events": last}), events),
            ],
        )
    )
    assert [status for status, _ in results] == [202, 202, 202]
    expected = {u: 4 for u in users}  # three clicks and the last view each, every repeat ignored
    wait_for(lambda: counts(ns.settings, users) == expected, "posted events folded")
