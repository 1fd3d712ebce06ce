"""Every service, started as its own `recstream serve NAME` process, exposes its recs_ metrics.

Each service runs on the test's topics, consumer groups and Redis prefix; the test waits until
``/metrics`` answers (a readiness check), reads the metric families from the exposition, then
stops the service with SIGTERM and expects a clean exit. A second test runs the stream processor,
the regeneration consumer and the cache writer together, sends real clickstream records through
them and checks the observations that only traffic produces: events out by topic, consumer lag of
every group per partition, regeneration latency and end-to-end freshness into the cache.
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from cli.supervise import Child, free_port
from recstream.security import kafka_config
from tests.conftest import Namespace, settings_env

pytestmark = pytest.mark.integration


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
            "recs_stream_events_out_total",
        },
    ),
    "regen": (
        lambda port, ns, _tmp: {
            "RECSTREAM_REGEN_METRICS_PORT": str(port),
            "RECSTREAM_REGEN_GROUP_ID": ns.group("regen"),
            "RECSTREAM_REGEN_POOL__WORKERS": "1",
        },
        {
            "recs_regen_changes_total",
            "recs_regen_regenerations_total",
            "recs_regen_published_total",
            "recs_regen_freshness_seconds",
            "recs_regen_latency_seconds",
            "recs_regen_poll_batch_messages",
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
            "RECSTREAM_CACHE_METRICS_PORT": str(port),
            "RECSTREAM_CACHE_GROUP_ID": ns.group("cache"),
        },
        {
            "recs_cache_writes_total",
            "recs_cache_stale_rejections_total",
            "recs_cache_invalid_messages_total",
            "recs_cache_batch_size",
            "recs_cache_freshness_seconds",
            "recs_consumer_lag_messages",
        },
    ),
    "api": (  # /metrics on its own port; the API's port (another free one) does not serve it
        lambda port, _ns, _tmp: {
            "RECSTREAM_API_METRICS_PORT": str(port),
            "RECSTREAM_API_PORT": str(free_port()),
        },
        {
            "recs_api_requests_total",
            "recs_api_request_latency_seconds",
            "recs_api_fallbacks_total",
        },
    ),
}


def scrape(url: str, child: Child, timeout_s: float) -> str:
    """GET ``url`` once the service answers; fail with its log if it dies or never answers."""
    bodies: list[str] = []

    def answered() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                bodies.append(response.read().decode())
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError):
            return False

    child.wait_healthy(answered, timeout_s)
    return bodies[-1]


def service_env(
    service: str, port: int, ns: Namespace, tmp: Path, artifact: Path
) -> dict[str, str]:
    """The environment of ``recstream serve service``: the test's topics, prefix and groups."""
    return {
        **settings_env(ns.settings),
        "RECSTREAM_REGEN_MODEL_DIR": str(artifact),  # read by the regeneration service only
        **SERVICES[service][0](port, ns, tmp),
    }


def start(service: str, env: dict[str, str], log: Path) -> Child:
    return Child.spawn(service, [sys.executable, "-m", "cli", "serve", service], log, env)


def stop(child: Child, *, signalled: bool = False) -> int:
    """SIGTERM (unless ``signalled`` already); fail with the log if the service ignores it.

    A second SIGTERM must not be sent: one that lands while the interpreter is finalizing (its
    handlers already reset) would kill a service that was shutting down cleanly.
    """
    code = child.stop(30, signalled=signalled)
    if code == -signal.SIGKILL:
        pytest.fail(f"{child.name} ignored SIGTERM:\n{child.log_tail()}")
    return code


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_service_exposes_its_metrics(
    service: str, ns: Namespace, tmp_path: Path, tiny_artifact: Path
) -> None:
    expected = SERVICES[service][1]
    port = free_port()
    env = service_env(service, port, ns, tmp_path, tiny_artifact)
    child = start(service, env, tmp_path / f"{service}.log")
    try:
        exposition = scrape(f"http://127.0.0.1:{port}/metrics", child, timeout_s=90)
        if service == "api":
            main_port = env["RECSTREAM_API_PORT"]
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(f"http://127.0.0.1:{main_port}/metrics", timeout=5)
    finally:
        code = stop(child)
    missing = expected - families(exposition)
    assert not missing, f"{service} /metrics lacks {sorted(missing)}"
    assert code == 0, f"{service} exited with {code}:\n{child.log_tail()}"


Sample = tuple[str, dict[str, str], float]


def samples(exposition: str) -> list[Sample]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    ]


def value(found: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(
        v for n, ls, v in found if n == name and all(ls.get(k) == x for k, x in labels.items())
    )


def lag_partitions(found: list[Sample], group: str, topic: str) -> set[str]:
    return {
        ls["partition"]
        for n, ls, _ in found
        if n == "recs_consumer_lag_messages" and ls["group"] == group and ls["topic"] == topic
    }


def test_traffic_shows_lag_latency_events_out_and_freshness(
    ns: Namespace, tmp_path: Path, tiny_artifact: Path
) -> None:
    s = ns.settings
    extra = {
        "streams": {
            "RECSTREAM_STREAMS_LAG_INTERVAL_S": "0.5",
            "RECSTREAM_STREAMS_BATCH_WITHIN_S": "0.05",
        },
        "regen": {"RECSTREAM_REGEN_STATS_INTERVAL_MS": "500", "RECSTREAM_REGEN_DEBOUNCE_MS": "20"},
        "cache-writer": {"RECSTREAM_CACHE_STATS_INTERVAL_MS": "500"},
    }
    running: dict[str, tuple[Child, int]] = {}
    try:
        for service, more in extra.items():
            port = free_port()
            env = {**service_env(service, port, ns, tmp_path, tiny_artifact), **more}
            running[service] = (start(service, env, tmp_path / f"{service}.log"), port)

        def scraped(service: str) -> list[Sample]:
            child, port = running[service]
            return samples(scrape(f"http://127.0.0.1:{port}/metrics", child, timeout_s=90))

        for service in running:  # every service is up (the regeneration pool has loaded)
            scraped(service)
        sent_at = time.time()
        users = [f"u{n}" for n in range(8)]  # spread over the partitions
        producer = Producer({**kafka_config(s), "partitioner": "murmur2_random"})
        for n, user in enumerate(users):
            body = {
                "schema_version": 1,
                "event_id": f"{ns.token}-{n}",
                "type": "click",
                "user_id": user,
                "item_id": str(50 + n),  # ML-100K item ids
                "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            producer.produce(s.topic_clickstream, key=user.encode(), value=orjson.dumps(body))
        producer.produce(s.topic_clickstream, key=b"u0", value=b"{not json")
        assert producer.flush(30) == 0, "records not delivered"

        def until(
            service: str,
            condition: Callable[[list[Sample]], bool],
            what: str,
            timeout_s: float = 45,
        ) -> None:
            deadline = time.monotonic() + timeout_s
            while True:
                found = scraped(service)
                if condition(found):
                    return
                if time.monotonic() > deadline:
                    seen = [
                        (n, ls, v)
                        for n, ls, v in found
                        if n.startswith(("recs_consumer_lag", "recs_stream_events_out"))
                    ]
                    pytest.fail(f"{service}: no {what} after {timeout_s}s; last seen {seen}")
                time.sleep(0.2)

        group = ns.group("streams")  # the fold worker's Faust app id is its consumer group
        until(
            "streams",
            lambda f: (
                value(f, "recs_stream_events_out_total", topic=s.topic_profiles_changed)
                >= len(users)
                and value(f, "recs_stream_events_out_total", topic=s.topic_dlq) == 1
                and len(lag_partitions(f, group, s.topic_clickstream)) == s.topic_partitions
                and value(f, "recs_consumer_lag_messages", group=group) == 0
            ),
            "events out by topic and a drained lag for every partition",
        )
        until(
            "regen",
            lambda f: (
                value(f, "recs_regen_latency_seconds_count") >= 1
                and value(f, "recs_regen_poll_batch_messages_count") >= 1
                and bool(lag_partitions(f, ns.group("regen"), s.topic_profiles_changed))
            ),
            "regeneration latency, poll batches and lag",
        )
        until(
            "cache-writer",
            lambda f: (
                value(f, "recs_cache_freshness_seconds_count", source="header") >= len(users)
                and bool(lag_partitions(f, ns.group("cache"), s.topic_recommendations))
            ),
            "freshness measured from the clickstream header, and lag",
        )
        cache = scraped("cache-writer")
        regen = scraped("regen")
        elapsed = time.time() - sent_at
        # Measured from the clickstream records' produce time: never longer than this test
        # has waited since sending them, and no list went without its origin header.
        freshness = value(cache, "recs_cache_freshness_seconds_sum", source="header")
        count = value(cache, "recs_cache_freshness_seconds_count", source="header")
        assert 0 < freshness / count <= elapsed
        assert value(cache, "recs_cache_freshness_seconds_count", source="trigger_ts") == 0
        latency = value(regen, "recs_regen_latency_seconds_sum")
        assert 0 < latency / value(regen, "recs_regen_latency_seconds_count") <= elapsed
    finally:
        for child, _port in running.values():
            child.signal(signal.SIGTERM)  # all at once: they drain in parallel
        codes = {service: stop(child, signalled=True) for service, (child, _) in running.items()}
    for service, code in codes.items():
        child = running[service][0]
        assert code == 0, f"{service} exited with {code}:\n{child.log_tail()}"
