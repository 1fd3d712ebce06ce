"""`recstream run` starts every service, answers health checks, and stops in order on SIGINT."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Namespace

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def test_run_starts_the_pipeline_and_stops_it_cleanly(ns: Namespace, tmp_path: Path) -> None:
    s = ns.settings
    api, regen, cache = _free_port(), _free_port(), _free_port()
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
    }
    command = [
        sys.executable,
        "-m",
        "cli",
        "run",
        "--regen-metrics-port",
        str(regen),
        "--cache-writer-metrics-port",
        str(cache),
    ]
    with (tmp_path / "run.log").open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 50
        while not all(_healthy(port) for port in (api, regen, cache)):
            assert process.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "services did not become healthy"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = (tmp_path / "run.log").read_text()
    order = [log.index(f"stopping {name}") for name in ("streams", "regen", "cache-writer", "api")]
    assert order == sorted(order)
    assert "regeneration consumer closed" in log
    assert "cache writer closed" in log
    assert not any(_healthy(port) for port in (api, regen, cache))
