"""Prometheus metrics of the stream processor; all names start with ``recs_``."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

EVENTS_IN = Counter(
    "recs_stream_events_in_total", "Clickstream records received by the fold agent.", ["topic"]
)
DEAD_LETTERED = Counter(
    "recs_stream_dead_lettered_total", "Records sent to the dead-letter topic.", ["reason"]
)
IGNORED = Counter(
    "recs_stream_events_ignored_total",
    "Valid events not folded: duplicates (event_id already folded) or later than retention.",
    ["reason"],
)
FOLDED = Counter("recs_stream_events_folded_total", "Events folded into profiles.")
PROFILE_CHANGES = Counter(
    "recs_stream_profile_changes_emitted_total", "ProfileChanged messages emitted."
)
FOLD_SECONDS = Histogram(
    "recs_stream_fold_latency_seconds",
    "Per event: from arrival in the agent to its profile update committed in Redis.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
BATCH_SIZE = Histogram(
    "recs_stream_batch_events",
    "Events per folded batch.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
