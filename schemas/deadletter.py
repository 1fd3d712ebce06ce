"""The dead-letter contract: what a record carries when a service refuses it.

Every topic the system reads has a dead-letter topic (``clickstream.dlq``, ``profiles.changed.dlq``,
``recommendations.dlq``). A refused record goes there with its original key and bytes, so nothing
is lost and it can be replayed once the cause is fixed, and with these headers, so an operator
can see why and where it came from without parsing the payload.
"""

from __future__ import annotations

from schemas.messages import Envelope

__all__ = [
    "DETAIL_MAX_BYTES",
    "HEADER_DETAIL",
    "HEADER_REASON",
    "HEADER_SOURCE_OFFSET",
    "HEADER_SOURCE_PARTITION",
    "HEADER_SOURCE_TOPIC",
    "dead_letter_headers",
]

HEADER_REASON = "dlq.reason"
HEADER_DETAIL = "dlq.detail"
HEADER_SOURCE_TOPIC = "dlq.source.topic"
HEADER_SOURCE_PARTITION = "dlq.source.partition"
HEADER_SOURCE_OFFSET = "dlq.source.offset"

# A detail is for a person reading the DLQ; a bound keeps a hostile payload echoed into an error
# message from doubling the record's size.
DETAIL_MAX_BYTES = 512


def dead_letter_headers(source: Envelope, reason: str, detail: str) -> list[tuple[str, bytes]]:
    """Headers of the dead letter for ``source``: a stable reason code, a short detail, origin."""
    return [
        (HEADER_REASON, reason.encode()),
        (HEADER_DETAIL, detail.encode("utf-8", "replace")[:DETAIL_MAX_BYTES]),
        (HEADER_SOURCE_TOPIC, source.topic.encode("utf-8", "replace")),
        (HEADER_SOURCE_PARTITION, str(source.partition).encode()),
        (HEADER_SOURCE_OFFSET, str(source.offset).encode()),
    ]
