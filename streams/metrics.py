"""Prometheus metrics of the stream processor; all names start with ``recs_``.

``recs_consumer_lag_messages`` is defined here and shared with the consumers
(``consumers/metrics.py``), so every service reports lag under one name and label set.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import Counter, Gauge, Histogram

ORIGIN_HEADER = "recs.origin_ts"
"""Kafka header on ``profiles.changed`` and ``recommendations`` records: the produce time (epoch
milliseconds, ASCII) of the clickstream record that triggered them, for end-to-end freshness."""

CONSUMER_LAG = Gauge(
    "recs_consumer_lag_messages",
    "Messages behind the partition's high watermark: the high watermark minus the next offset "
    "the consumer hands to the application.",
    ["group", "topic", "partition"],
)

EVENTS_IN = Counter(
    "recs_stream_events_in_total", "Clickstream records received by the fold agent.", ["topic"]
)
DEAD_LETTERED = Counter(
    "recs_stream_dead_lettered_total", "Records sent to the dead-letter topic.", ["reason"]
)
IGNORED = Counter(
    "recs_stream_events_ignored_total",
    "Valid events not folded: duplicates (event_id already folded), later than retention, or "
    "of an erased history.",
    ["reason"],
)
ERASURES_REFUSED = Gauge(
    "recs_erasure_records_refused",
    "Records on users.erased that the latest whole read of the topic refused (not a UserErased "
    "of the user in its key): they erase nobody. Only admin and the eraser may write there, so "
    "anything above 0 wants an operator.",
)
FOLDED = Counter("recs_stream_events_folded_total", "Events folded into profiles.")
EVENTS_OUT = Counter(
    "recs_stream_events_out_total",
    "Records the fold worker produced, by topic (profile changes and dead letters).",
    ["topic"],
)
TRENDING_COUNTED = Counter(
    "recs_stream_trending_counted_total",
    "Items new to a profile added to the per-day recent-popularity counts (by the fold).",
)
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


def observe_many(histogram: Histogram, values: Sequence[float]) -> None:
    """``histogram.observe(v)`` for every value, with one increment per bucket.

    Observing tens of thousands of fold latencies per second one by one costs more than the
    values are worth; this produces the same exposition. It uses prometheus_client's
    ``_upper_bounds``/``_buckets``/``_sum`` and falls back to plain ``observe`` without them.
    """
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)
    total.inc(sum(values))


def record_lag(group: str, partitions: Iterable[tuple[str, int, int | None, int | None]]) -> int:
    """Set ``CONSUMER_LAG`` from ``(topic, partition, high watermark, next offset)`` tuples.

    A partition whose high watermark or position is not known yet (None) is left out, and the
    series of partitions this group no longer reports are removed (after a rebalance another
    worker owns them). Returns how many partitions were reported.
    """
    now: set[tuple[str, str]] = set()
    for topic, partition, high, position in partitions:
        if high is None or position is None:
            continue
        CONSUMER_LAG.labels(group, topic, str(partition)).set(max(high - position, 0))
        now.add((topic, str(partition)))
    for gone_topic, gone_partition in _lag_series.get(group, set()) - now:
        CONSUMER_LAG.remove(group, gone_topic, gone_partition)
    _lag_series[group] = now
    return len(now)


_lag_series: dict[str, set[tuple[str, str]]] = {}
