"""Prometheus metrics of the consumers, and the small HTTP server that exposes them.

Names carry the ``recs_`` prefix and their unit. Consumer lag comes from librdkafka's statistics
(``statistics.interval.ms``), per topic and partition, into ``recs_consumer_lag_messages``, the
gauge the stream processor defines (``streams/metrics.py``) so all services share one series name.

End-to-end timing uses the ``recs.origin_ts`` header (:data:`streams.metrics.ORIGIN_HEADER`): the
stream processor sets it on each ``ProfileChanged`` to the Kafka timestamp of the clickstream record
that triggered it, the regeneration consumer copies it onto the ``Recommendations`` it publishes
and the cache writer measures from it to the moment the list is in Redis.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from streams.metrics import CONSUMER_LAG, ORIGIN_HEADER

__all__ = [
    "BAD_HEADERS",
    "CACHE_BATCH_SIZE",
    "CACHE_FRESHNESS",
    "CACHE_INVALID",
    "CACHE_REDIS_ERRORS",
    "CACHE_STALE",
    "CACHE_WRITES",
    "CONSUMER_LAG",
    "EMBEDDINGS_NOTICES",
    "EMBEDDINGS_PUBLISH_ERRORS",
    "EMBEDDINGS_SKIPPED",
    "EMBEDDINGS_USER_EPSILON",
    "ORIGIN_HEADER",
    "REGEN_COALESCED",
    "REGEN_FRESHNESS",
    "REGEN_INVALID",
    "REGEN_LATENCY",
    "REGEN_MESSAGES",
    "REGEN_MISSING_PROFILE",
    "REGEN_PAUSED",
    "REGEN_PENDING_USERS",
    "REGEN_POLL_BATCH",
    "REGEN_PUBLISHED",
    "REGEN_PUBLISH_ERRORS",
    "REGEN_REGENERATIONS",
    "REGEN_RETURNING",
    "REGEN_TITLE_FAILURES",
    "REGEN_TRENDING_FAILURES",
    "REGEN_TRENDING_ITEMS",
    "MetricsServer",
    "origin_ts",
    "parse_origin_ms",
    "record_lag",
]

log = logging.getLogger(__name__)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# From the end of the debounce window's range up: a regeneration waits up to debounce_ms first.
_REGEN_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
# Clickstream produce → list in Redis spans the fold batch, debounce, model and two Kafka hops.
_FRESHNESS_SECONDS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0)

REGEN_MESSAGES = Counter("recs_regen_changes_total", "ProfileChanged messages consumed.")
REGEN_INVALID = Counter(
    "recs_regen_invalid_messages_total", "Messages on profiles.changed that failed validation."
)
REGEN_COALESCED = Counter(
    "recs_regen_coalesced_changes_total",
    "Changes answered by another change's regeneration (debounced or already covered).",
)
REGEN_REGENERATIONS = Counter(
    "recs_regen_regenerations_total", "Recommendation lists computed.", ["source"]
)
REGEN_PUBLISHED = Counter("recs_regen_published_total", "Lists delivered to the output topic.")
REGEN_RETURNING = Counter(
    "recs_regen_returning_total",
    "Returning users' lists: scheduled, made again (published) or dropped (the history grew, "
    "the profile is gone, the refresh horizon passed).",
    ["outcome"],
)
REGEN_PUBLISH_ERRORS = Counter(
    "recs_regen_publish_errors_total", "Lists the broker did not accept (offsets kept open)."
)
REGEN_TITLE_FAILURES = Counter(
    "recs_regen_title_lookup_failures_total",
    "Reads of reasons' catalog titles that Redis did not answer (those lists carry ids only).",
)
REGEN_TRENDING_FAILURES = Counter(
    "recs_regen_trending_read_failures_total",
    "Reads of the recent-popularity counts that Redis did not answer (the last ones stay).",
)
REGEN_TRENDING_ITEMS = Gauge(
    "recs_regen_trending_items",
    "Items with a recent-popularity count in the window handed to the model.",
)
REGEN_MISSING_PROFILE = Counter(
    "recs_regen_missing_profiles_total", "Changes for users without a profile in Redis."
)
REGEN_LATENCY = Histogram(
    "recs_regen_latency_seconds",
    "Per regeneration: first change consumed (debounce included) to the list's delivery on the "
    "output topic.",
    buckets=_REGEN_SECONDS,
)
REGEN_POLL_BATCH = Histogram(
    "recs_regen_poll_batch_messages",
    "Messages taken from profiles.changed per poll of the regeneration loop.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)
REGEN_FRESHNESS = Histogram(
    "recs_regen_freshness_seconds",
    "Triggering event time to the list's delivery on the output topic.",
    buckets=_SECONDS,
)
REGEN_PAUSED = Gauge("recs_regen_paused", "1 while input partitions are paused (backpressure).")
REGEN_PENDING_USERS = Gauge("recs_regen_pending_users", "Users waiting in the debounce window.")

CACHE_WRITES = Counter("recs_cache_writes_total", "Lists written to recs:{user}.")
CACHE_STALE = Counter(
    "recs_cache_stale_rejections_total",
    "Lists not written because the cache held a newer profile_version.",
)
CACHE_INVALID = Counter(
    "recs_cache_invalid_messages_total", "Messages on recommendations that failed validation."
)
CACHE_REDIS_ERRORS = Counter(
    "recs_cache_redis_errors_total", "Redis round trips of the cache writer that failed (retried)."
)
CACHE_FRESHNESS = Histogram(
    "recs_cache_freshness_seconds",
    "Per list written: produce time of the triggering clickstream record (recs.origin_ts header; "
    "without it, the event's trigger_ts when recent) to the list's Redis write.",
    ["source"],
    buckets=_FRESHNESS_SECONDS,
)
EMBEDDINGS_NOTICES = Counter(
    "recs_embeddings_notices_total",
    "profiles.changed records read by the embeddings publisher (outcome=in) and how each ended: "
    "published (a release delivered, or a granted one delivered again), duplicate (its profile "
    "version was already released), over_budget (the user's privacy budget is spent), skipped "
    "(unreadable, no profile, version ahead, no item in the index).",
    ["outcome"],
)
EMBEDDINGS_SKIPPED = Counter(
    "recs_embeddings_skipped_total",
    "Change notices the embeddings publisher skipped, by reason (regeneration dead-letters them).",
    ["reason"],
)
EMBEDDINGS_USER_EPSILON = Histogram(
    "recs_embeddings_user_epsilon",
    "Per granted release: the user's total ε in the current budget window after it (zCDP).",
    buckets=(0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0),
)
EMBEDDINGS_PUBLISH_ERRORS = Counter(
    "recs_embeddings_publish_errors_total", "Releases the broker did not accept (service exits)."
)
BAD_HEADERS = Counter(
    "recs_bad_headers_total",
    "Record headers ignored because their value was malformed (treated as absent).",
    ["service", "header"],
)
CACHE_BATCH_SIZE = Histogram(
    "recs_cache_batch_size",
    "Lists per Redis round trip.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)


# Epoch milliseconds have 13 digits until the year 2286; 15 leave room and keep every accepted
# value far inside a float, so a hostile header can never overflow the arithmetic that uses it.
ORIGIN_MAX_DIGITS = 15


def parse_origin_ms(raw: bytes | str | None) -> float | None:
    """A ``recs.origin_ts`` header value (epoch milliseconds) in epoch seconds, or ``None``.

    Only 1 to :data:`ORIGIN_MAX_DIGITS` ASCII digits are accepted: no sign, no space, no
    exponent, no NaN; anything else is treated as absent.
    """
    if raw is None:
        return None
    text = raw if isinstance(raw, bytes) else raw.encode("utf-8", "replace")
    if not 0 < len(text) <= ORIGIN_MAX_DIGITS or not text.isdigit():
        return None
    return int(text) / 1000.0


def origin_ts(message: Any, service: str) -> float | None:
    """The ``recs.origin_ts`` header of a record in epoch seconds, or None (absent, malformed).

    A malformed value is ignored, as if absent, and counted in ``recs_bad_headers_total``: a
    header is metadata for timing and must never stop a consumer.
    """
    headers = message.headers() or []
    # A consumed record's headers are a list of pairs; the stub also allows the producer's dict.
    pairs = list(headers.items()) if isinstance(headers, dict) else headers
    for name, value in pairs:
        if name == ORIGIN_HEADER:
            parsed = parse_origin_ms(value)
            if parsed is None:
                BAD_HEADERS.labels(service, ORIGIN_HEADER).inc()
            return parsed
    return None


def record_lag(group: str, stats_json: str) -> None:
    """librdkafka ``stats_cb``: export ``consumer_lag`` of every assigned partition."""
    stats = json.loads(stats_json)
    for topic, info in stats.get("topics", {}).items():
        for partition, pinfo in info.get("partitions", {}).items():
            lag = pinfo.get("consumer_lag", -1)
            if partition != "-1" and lag >= 0:
                CONSUMER_LAG.labels(group, topic, partition).set(lag)


class MetricsServer:
    """Serves ``/metrics`` (Prometheus text) and ``/healthz`` (JSON) on a background thread."""

    def __init__(
        self, host: str, port: int, health: Callable[[], tuple[bool, dict[str, Any]]]
    ) -> None:
        health_check = health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest())
                elif self.path == "/healthz":
                    ok, detail = health_check()
                    body = json.dumps({"ok": ok, **detail}).encode()
                    self._reply(200 if ok else 503, "application/json", body)
                else:
                    self._reply(404, "application/json", b'{"error": "not found"}')

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@contextmanager
def serving_metrics(
    host: str, port: int, health: Callable[[], tuple[bool, dict[str, Any]]]
) -> Iterator[MetricsServer | None]:
    """Serve ``/metrics`` and ``/healthz`` for the duration of the block; port 0 serves nothing."""
    if not port:
        yield None
        return
    server = MetricsServer(host, port, health).start()
    try:
        yield server
    finally:
        server.close()
