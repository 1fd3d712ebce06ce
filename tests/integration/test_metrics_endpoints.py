"""Every service, started as its own `recstream serve NAME` process, exposes its recs_ metrics.

Each service runs on the test's topics, consumer groups and Redis prefix; the test waits until
``/metrics`` answers (a readiness check), reads the metric families from the exposition, then
stops the service with SIGTERM and expects a clean exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Namespace

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def families(exposition: str) -> set[str]:
    """Metric names declared in a Prometheus text exposition (``# TYPE name kind``)."""
    return {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE ")}


# service -> (extra env given the port and namespace, families it must expose)
SERVICES: dict[str, tuple[Callable[[int, Namespace, Path], dict[str, str]], set[str]]] = {
    "streams": (
        lambda port, ns, tmp: {
            "RECSTREAM_STREAMS_METRICS_PORT": str(port),
            "RECSTREAM_STREAMS_APP_ID": ns.group("streams"),
            "RECSTREAM_STREAMS_DATADIR": str(tmp),
            "RECSTREAM_STREAMS_LOGLEVEL": "warning",
        },
        {
            "recs_stream_events_in_total",
            "recs_stream_events_folded_total",
            "recs_stream_dead_lettered_total",
            "recs_stream_events_ignored_total",
            "recs_stream_profile_changes_emitted_total",
            "recs_stream_fold_latency_seconds",
            "recs_stream_batch_events",
        },
    ),
    "regen": (
        lambda port, ns, _tmp: {
            "RECSTREAM_METRICS_PORT": str(port),
            "RECSTREAM_REGEN_GROUP_ID": ns.group("regen"),
            "RECSTREAM_WORKERS": "1",
        },
        {
            "recs_regen_changes_total",
            "recs_regen_regenerations_total",
            "recs_regen_published_total",
            "recs_regen_freshness_seconds",
            "recs_regen_pending_users",
            "recs_regen_paused",
            "recs_consumer_lag_messages",
            "recs_pool_queue_depth",
            "recs_pool_inflight_requests",
            "recs_pool_workers_ready",
            "recs_pool_batch_size",
            "recs_pool_request_latency_seconds",
            "recs_pool_fallbacks_total",
        },
    ),
    "cache-writer": (
        lambda port, ns, _tmp: {
            "RECSTREAM_METRICS_PORT": str(port),
            "RECSTREAM_CACHE_GROUP_ID": ns.group("cache"),
        },
        {
            "recs_cache_writes_total",
            "recs_cache_stale_rejections_total",
            "recs_cache_invalid_messages_total",
            "recs_cache_batch_size",
            "recs_consumer_lag_messages",
        },
    ),
    "api": (
        lambda port, _ns, _tmp: {"RECSTREAM_API_PORT": str(port)},
        {
            "recs_api_requests_total",
            "recs_api_request_latency_seconds",
            "recs_api_fallbacks_total",
        },
    ),
}


def scrape(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> str:
    """GET ``url`` once the service answers; fail with its log if it dies or never answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"service exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                assert response.status == 200
                return str(response.read().decode())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                pytest.fail(f"{url} did not answer in {timeout_s}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_exposes_its_metrics(service: str, ns: Namespace, tmp_path: Path) -> None:
    make_env, expected = SERVICES[service]
    port = free_port()
    s = ns.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSTREAM_")}
    env.update(
        {
            "RECSTREAM_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "RECSTREAM_REDIS_URL": s.redis_url.get_secret_value(),
            "RECSTREAM_KEY_PREFIX": s.key_prefix,
            "RECSTREAM_TOPIC_CLICKSTREAM": s.topic_clickstream,
            "RECSTREAM_TOPIC_DLQ": s.topic_dlq,
            "RECSTREAM_TOPIC_PROFILES_CHANGED": s.topic_profiles_changed,
            "RECSTREAM_TOPIC_RECOMMENDATIONS": s.topic_recommendations,
            "RECSTREAM_TOPIC_PARTITIONS": str(s.topic_partitions),
            **make_env(port, ns, tmp_path),
        }
    )
    log = tmp_path / f"{service}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recstream", "serve", service],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        exposition = scrape(f"http://127.0.0.1:{port}/metrics", proc, log, timeout_s=90)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                pytest.fail(f"{service} ignored SIGTERM:\n{log.read_text()[-3000:]}")
    missing = expected - families(exposition)
    assert not missing, f"{service} /metrics lacks {sorted(missing)}"
    assert code == 0, f"{service} exited with {code}:\n{log.read_text()[-3000:]}"
