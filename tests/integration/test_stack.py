"""The local stack that `recstream stack up` started answers, and `up` again reuses it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import main
from recstream.security import kafka_config
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

    admin = AdminClient(kafka_config(stack_ready))
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
    topics = AdminClient(kafka_config(stack_ready)).list_topics(timeout=10)
    assert not set(names) & set(topics.topics)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _poll(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:.0f}s"
        time.sleep(0.05)


def test_a_killed_redis_comes_back_with_its_data(tmp_path: Path) -> None:
    """A Redis of its own (own port and stack dir): SIGKILL it, restart it, the data is there."""
    import redis

    from cli.stack import Stack, StackSettings

    port = _free_port()
    settings = StackSettings(
        stack_dir=tmp_path / "stack",
        redis_url=f"redis://127.0.0.1:{port}/0",
        kafka_bootstrap="127.0.0.1:1",  # never started: only Redis is under test
        stack_redis_maxmemory="64mb",
    )
    stack = Stack(settings)
    stack.up(say=lambda _: None, only=("redis",))
    try:
        client = redis.Redis(port=port, socket_timeout=5)
        config = client.config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction"
        assert int(config["maxmemory"]) == 64 * 1024 * 1024
        assert Path(config["dir"]) == settings.stack_dir / "redis"
        client.hset("durable:profile:u1", mapping={"version": 7, "events": 3})
        client.sadd("durable:seen:u1", "e1", "e2", "e3")

        # A SIGKILL keeps what Redis has written to its AOF (the kernel holds it; fsync every
        # second is what guards against a machine crash): wait until the write is no longer in
        # Redis's own buffer and no fsync is pending, then kill it.
        def aof_written() -> bool:
            info = client.info("persistence")
            return (
                info["aof_last_write_status"] == "ok"
                and info["aof_buffer_length"] == 0
                and info["aof_pending_bio_fsync"] == 0
            )

        _poll(aof_written, "the AOF write")
        old_pid = stack.state.procs["redis"].pid
        stack.restart_redis(kill=True)
        assert stack.state.procs["redis"].pid != old_pid
        with pytest.raises(ProcessLookupError):
            os.kill(old_pid, 0)
        client = redis.Redis(port=port, socket_timeout=5)
        _poll(lambda: client.info("persistence")["loading"] == 0, "the AOF load")
        assert client.hgetall("durable:profile:u1") == {b"version": b"7", b"events": b"3"}
        assert client.smembers("durable:seen:u1") == {b"e1", b"e2", b"e3"}

        # noeviction: a full Redis refuses a write instead of evicting the profile.
        client.config_set("maxmemory", client.info("memory")["used_memory"])
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            client.set("durable:filler", "x" * 1_000_000)
        assert client.exists("durable:profile:u1", "durable:seen:u1") == 2
        client.close()
    finally:
        stack.down(say=lambda _: None)
    assert not stack.redis_ready()
