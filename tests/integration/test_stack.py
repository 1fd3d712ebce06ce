"""The local stack that `recstream stack up` started answers, and `up` again reuses it."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.main import main
from recstream.settings import CommonSettings

pytestmark = pytest.mark.integration


def test_up_on_a_running_stack_reuses_it(stack_ready: CommonSettings) -> None:
    result = CliRunner().invoke(main, ["stack", "up"])
    assert result.exit_code == 0, result.output
    assert "kafka: reusing" in result.output
    assert "redis: reusing" in result.output


def test_status_reports_both_ready(stack_ready: CommonSettings) -> None:
    result = CliRunner().invoke(main, ["stack", "status", "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)
    assert status["kafka"]["ready"] is True
    assert status["redis"]["ready"] is True


def test_pipeline_topics_exist(stack_ready: CommonSettings) -> None:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": stack_ready.kafka_bootstrap})
    topics = admin.list_topics(timeout=10).topics
    for name in stack_ready.topics():
        assert name in topics
        assert len(topics[name].partitions) == stack_ready.topic_partitions


def test_deleted_topics_are_gone_when_delete_returns(stack_ready: CommonSettings) -> None:
    import uuid

    from confluent_kafka.admin import AdminClient

    from cli.stack import Stack

    names = [f"doomed-{uuid.uuid4().hex[:10]}-{n}" for n in range(2)]
    stack = Stack()
    assert stack.create_topics(names, 1) == names
    stack.delete_topics([*names, f"never-created-{uuid.uuid4().hex[:10]}"])
    topics = AdminClient({"bootstrap.servers": stack_ready.kafka_bootstrap}).list_topics(timeout=10)
    assert not set(names) & set(topics.topics)
