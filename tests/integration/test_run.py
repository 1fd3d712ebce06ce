"""`recstream run` starts every service, restarts one that crashes, and stops in order on SIGINT.

A service that keeps crashing makes `run` stop everything and fail.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from cli.supervise import Child, ChildFailedError, free_port, http_ok
from tests.conftest import Namespace

pytestmark = pytest.mark.integration


def _healthy(port: int) -> bool:
    # The regeneration service pings its model workers for up to 2 s before it answers.
    return http_ok(f"http://127.0.0.1:{port}/healthz", timeout_s=5)()


def test_run_starts_the_pipeline_and_stops_it_cleanly(
    ns: Namespace, tmp_path: Path, tiny_artifact: Path
) -> None:
    s = ns.settings
    api, regen, cache = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "RECSTREAM_KEY_PREFIX": s.key_prefix,
        "RECSTREAM_TOPIC_CLICKSTREAM": s.topic_clickstream,
        "RECSTREAM_TOPIC_DLQ": s.topic_dlq,
        "RECSTREAM_TOPIC_PROFILES_CHANGED": s.topic_profiles_changed,
        "RECSTREAM_TOPIC_RECOMMENDATIONS": s.topic_recommendations,
        "RECSTREAM_STREAMS_APP_ID": ns.group("streams"),
        "RECSTREAM_STREAMS_DATADIR": str(tmp_path),
        "RECSTREAM_REGEN_GROUP_ID": ns.group("regen"),
        "RECSTREAM_CACHE_GROUP_ID": ns.group("cache"),
        "RECSTREAM_API_PORT": str(api),
        "RECSTREAM_API_METRICS_PORT": str(free_port()),
        "RECSTREAM_REGEN_METRICS_PORT": str(regen),
        "RECSTREAM_CACHE_METRICS_PORT": str(cache),
        "RECSTREAM_STREAMS_METRICS_PORT": "0",
        "RECSTREAM_REGEN_MODEL_DIR": str(tiny_artifact),
    }
    # No per-service flags: each service reads its own variables from the one environment.
    command = [sys.executable, "-m", "cli", "run"]
    run = Child.spawn("run", command, tmp_path / "run.log", env)
    ports = {"api": api, "regen": regen, "cache-writer": cache}
    try:
        # Four services start at once; beside another test worker on two cores, the regeneration
        # pool's model workers alone can take most of a minute. A wait ends as soon as all answer.
        try:
            run.wait_healthy(lambda: all(_healthy(port) for port in ports.values()), timeout_s=120)
        except ChildFailedError as failed:
            silent = [name for name, port in ports.items() if not _healthy(port)]
            raise AssertionError(f"not answering /healthz: {silent}") from failed
        first = _pid_of("cache-writer", run.log_tail(100_000))
        os.kill(first, signal.SIGKILL)
        # It comes back as a new process that answers its health check again.
        run.wait_healthy(
            lambda: _pid_of("cache-writer", run.log_tail(100_000)) != first and _healthy(cache),
            timeout_s=120,
        )
        assert "cache-writer exited with status -9 (crash 1" in run.log_tail(100_000)
        run.signal(signal.SIGINT)
        assert run.stop(60, signalled=True) == 0, run.log_tail()
    finally:
        run.stop(5)
    log = (tmp_path / "run.log").read_text()
    order = [log.index(f"stopping {name}") for name in ("streams", "regen", "cache-writer", "api")]
    assert order == sorted(order)
    assert "regeneration consumer closed" in log
    assert "cache writer closed" in log
    assert not any(_healthy(port) for port in (api, regen, cache))


def _pid_of(service: str, log: str) -> int:
    """The pid of the newest ``service`` child that ``run`` logged starting."""
    return int(re.findall(rf"started {service} \(pid (\d+)\)", log)[-1])


def test_run_gives_up_on_a_service_that_keeps_crashing(tmp_path: Path) -> None:
    # An invalid port fails the API's settings at start-up, every time.
    env = {**os.environ, "RECSTREAM_API_PORT": "not-a-port"}
    command = [sys.executable, "-m", "cli", "run", "--max-crashes", "3", "--crash-window-s", "60"]
    command += ["--without", "streams", "--without", "regen", "--without", "cache-writer"]
    run = Child.spawn("run", command, tmp_path / "run.log", env)
    try:
        code = run.process.wait(60)
    finally:
        run.stop(5)
    log = run.log_tail(100_000)
    assert code == 1, log
    assert log.count("started api") == 3
    assert "restarting in 1.0s" in log and "restarting in 2.0s" in log
    assert "api crashed 3 times within 60s" in log
