"""Prometheus metrics of the read API (served by the API itself at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["EVENTS", "FALLBACKS", "LATENCY", "NOTICES", "REQUESTS", "TRENDING_FAILURES"]

REQUESTS = Counter("recs_api_requests_total", "HTTP requests answered.", ["route", "status"])
LATENCY = Histogram(
    "recs_api_request_latency_seconds",
    "Time to answer one request, in the handler.",
    ["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
FALLBACKS = Counter(
    "recs_api_fallbacks_total", "Requests answered with popular items (no cached list)."
)
# Not recs_records_total: that one counts records a service *reads* (in = folded + ...), and the
# API writes these.
EVENTS = Counter(
    "recs_api_events_total",
    "Events sent to POST /v1/events, by outcome: accepted (acknowledged by Kafka), refused (in a "
    "request answered 400: nothing produced; a 413's body is never read, so not counted), "
    "failed (Kafka refused them or did not ack in time: answered 503).",
    ["topic", "outcome"],
)
NOTICES = Counter(
    "recs_api_conversation_notices_total",
    "Change notices a conversation turn sent on profiles.changed (so the regeneration service "
    "publishes the refined list), by outcome: sent (acknowledged by Kafka) or failed (the turn "
    "was answered all the same; the list is refined at the user's next change).",
    ["outcome"],
)
TRENDING_FAILURES = Counter(
    "recs_api_trending_read_failures_total",
    "Reads of the recent-popularity counts for a conversation turn that Redis did not answer "
    "(the turn ranked with the window read before, or without one).",
)
