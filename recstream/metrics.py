"""The record-accounting metric every service that reads a topic exports.

Each record a service reads ends in exactly one outcome, so for every service and topic
``in = folded + duplicate + dead_lettered + erased`` holds once the service is idle. A gap means a
record was lost or is stuck; tests and the chaos benchmark check it.

- ``folded``: the record's effect was applied (events folded into a profile, a list regenerated
  and published, a list written to the cache);
- ``duplicate``: it changed nothing because its effect was already there (a replayed event, a
  change notice superseded by a newer version, a list older than the cached one);
- ``dead_lettered``: it was refused and sent, with its reason, to the topic's dead-letter topic;
- ``erased``: it belongs to the history of a user who was erased since (GDPR art. 17), so it is
  never applied (only the stream worker and rebuilds have this outcome).
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import Counter

__all__ = ["RECORDS", "Outcome", "count"]

Outcome = Literal["in", "folded", "duplicate", "dead_lettered", "erased"]

RECORDS = Counter(
    "recs_records_total",
    "Records read from a topic (outcome=in) and how each ended: folded, duplicate, dead_lettered, "
    "erased.",
    ["service", "topic", "outcome"],
)


def count(service: str, topic: str, outcome: Outcome, n: int = 1) -> None:
    """Count ``n`` records of ``topic`` read by ``service`` that ended in ``outcome``."""
    if n:
        RECORDS.labels(service, topic, outcome).inc(n)
