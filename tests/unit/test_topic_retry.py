"""Reading a topic's offsets rides out the errors Kafka calls retriable, and only those."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from recstream.kafka import retrying


def _failing(code: int, times: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def call() -> str:
        calls.append(1)
        if len(calls) <= times:
            raise KafkaException(KafkaError(code))
        return "offsets"

    return calls, call


def test_a_partition_without_a_leader_yet_is_asked_again() -> None:
    # Just after a topic is created its partitions may answer NOT_LEADER_FOR_PARTITION.
    calls, call = _failing(KafkaError.NOT_LEADER_FOR_PARTITION, 2)
    assert retrying(call, timeout_s=5) == "offsets"  # type: ignore[arg-type]
    assert len(calls) == 3


def test_an_error_that_is_not_retriable_is_raised_at_once_and_a_lasting_one_in_time() -> None:
    calls, call = _failing(KafkaError.TOPIC_AUTHORIZATION_FAILED, 5)
    with pytest.raises(KafkaException):
        retrying(call, timeout_s=5)  # type: ignore[arg-type]
    assert len(calls) == 1
    calls, call = _failing(KafkaError.NOT_LEADER_FOR_PARTITION, 1000)
    with pytest.raises(KafkaException):
        retrying(call, timeout_s=0.5)  # type: ignore[arg-type]
    assert 2 <= len(calls) <= 4
