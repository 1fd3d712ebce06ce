"""Shared settings, key naming, the stack's pure helpers and the child-process supervisor."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from cli.stack import Stack, StackSettings, _kafka_cluster_id
from cli.supervise import Child, ChildFailedError, terminate_group
from recstream.keys import Keys
from recstream.settings import CommonSettings, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@cache:6379/0", "redis://***@cache:6379/0"),
        ("redis://app:hunter2@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("rediss://u:p@w@host:1/2", "rediss://u:***@host:1/2"),
        (
            "rediss://:hunter2@cache:6380/0?ssl_cert_reqs=none",
            "rediss://***@cache:6380/0?ssl_cert_reqs=none",
        ),
        ("redis://cache:6379/0?password=hunter2", "redis://cache:6379/0?password=***"),
        ("redis://cache/0?db=1&Password=hunter2", "redis://cache/0?db=1&Password=***"),
        ("unix:///run/redis.sock?password=hunter2", "unix:///run/redis.sock?password=***"),
    ],
)
def test_redact_url_hides_passwords(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_settings_read_prefixed_env_and_keep_secrets_out_of_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RECSTREAM_REDIS_URL", "redis://:s3cret@example:6379/1")
    monkeypatch.setenv("RECSTREAM_TOPIC_CLICKSTREAM", "clicks-v2")
    monkeypatch.setenv("RECSTREAM_TOPIC_PARTITIONS", "8")
    settings = CommonSettings()
    assert settings.topic_clickstream == "clicks-v2"
    assert settings.topic_partitions == 8
    assert "s3cret" not in repr(settings)
    assert "s3cret" not in str(settings.model_dump())
    assert settings.topics()[0] == "clicks-v2"


def test_settings_are_frozen() -> None:
    settings = CommonSettings()
    with pytest.raises(ValueError, match="frozen"):
        settings.key_prefix = "x"  # type: ignore[misc]  # assignment must fail at run time


def test_keys_apply_prefix() -> None:
    keys = Keys("ns1:")
    assert keys.profile("42") == "ns1:u:{42}:profile"
    assert keys.recs("42") == "ns1:u:{42}:recs"
    assert keys.item("7") == "ns1:item:7"
    assert Keys().profile("42") == "u:{42}:profile"


def test_cluster_id_is_22_url_safe_chars() -> None:
    ids = {_kafka_cluster_id() for _ in range(500)}
    assert len(ids) == 500
    for cid in ids:
        assert len(cid) == 22
        assert not cid.startswith("-")  # `kafka-storage format -t -x...` reads it as an option
        assert set(cid) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_broker_properties_follow_settings(tmp_path: Path) -> None:
    stack = Stack(StackSettings(stack_dir=tmp_path, topic_partitions=3))
    props = stack._write_properties("127.0.0.1", 19092, 19093).read_text()
    lines = dict(line.split("=", 1) for line in props.splitlines())
    assert lines["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert lines["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert lines["num.partitions"] == "3"
    assert lines["log.dirs"] == str(tmp_path / "kafka" / "data")


def test_status_of_an_unstarted_stack_reports_down(tmp_path: Path) -> None:
    settings = StackSettings(
        stack_dir=tmp_path, kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0"
    )
    status = Stack(settings).status()
    assert status["kafka"]["ready"] is False
    assert status["redis"]["ready"] is False
    assert status["kafka"]["started_by_stack"] is False


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    child = Child.spawn("stubborn", _python(code), tmp_path / "stubborn.log")
    assert child.wait_healthy(lambda: "ready" in child.log_tail(), timeout_s=30)
    assert child.stop(grace_s=0.2) == -signal.SIGKILL
    with pytest.raises(ChildProcessError):  # reaped: no zombie left behind
        os.waitpid(child.pid, os.WNOHANG)


def test_waiting_for_health_fails_fast_with_the_log_when_the_child_exits(tmp_path: Path) -> None:
    code = "print('cannot start: no model', flush=True); raise SystemExit(3)"
    child = Child.spawn("broken", _python(code), tmp_path / "broken.log")
    with pytest.raises(ChildFailedError, match=r"(?s)exited during start-up \(3\).*no model"):
        child.wait_healthy(lambda: False, timeout_s=600)


def test_terminate_group_reaps_its_own_child(tmp_path: Path) -> None:
    # The demo starts the stack and stops it in one process: `down` must reap what `up` spawned,
    # or the exited broker stays a zombie that looks alive for the whole grace period.
    child = Child.spawn("sleeper", _python("import time; time.sleep(60)"), tmp_path / "s.log")
    terminate_group(child.pid, grace_s=600)
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)
    child.process.poll()  # the Popen handle learns its process is gone (no ResourceWarning)


def test_redis_runs_with_an_aof_in_the_stack_dir_and_never_evicts(tmp_path: Path) -> None:
    stack = Stack(StackSettings(stack_dir=tmp_path, stack_redis_maxmemory="512mb"))
    args = stack.redis_args(16379)
    flags = dict(zip(args[::2], args[1::2], strict=True))
    assert flags["--bind"] == "127.0.0.1"
    assert flags["--port"] == "16379"
    assert flags["--dir"] == str(tmp_path / "redis")
    assert flags["--appendonly"] == "yes"
    assert flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory"] == "512mb"
    assert flags["--maxmemory-policy"] == "noeviction"


def test_stack_settings_refuse_a_malformed_memory_limit() -> None:
    with pytest.raises(ValueError, match="stack_redis_maxmemory"):
        StackSettings(stack_redis_maxmemory="lots")


def test_down_reaps_a_component_that_exited_on_its_own(tmp_path: Path) -> None:
    # A broker that failed to start (a port taken) is a zombie child of the process that ran
    # `up`: `down` must reap it, not leave a Popen that still thinks it runs.
    stack = Stack(StackSettings(stack_dir=tmp_path))
    stack.logs.mkdir(parents=True)
    proc = stack._spawn("kafka", _python("raise SystemExit(1)"), stack.logs / "kafka.log", "x")
    child = stack.children["kafka"]
    while proc.alive():
        time.sleep(0.01)
    said: list[str] = []
    stack.down(say=said.append)
    assert said == ["kafka: was not running"]
    assert child.process.returncode == 1
    assert "kafka" not in stack.children
