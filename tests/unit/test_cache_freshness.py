"""The cache writer's end-to-end freshness: what is observed, from which origin, and when not."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from consumers.cache_writer import CacheWriter, CasOutcome
from consumers.metrics import CACHE_FRESHNESS, ORIGIN_HEADER
from consumers.settings import CacheWriterSettings
from schemas import ModelRef, Recommendations, ScoredItem


@dataclass
class FakeRecord:
    """The parts of a confluent-kafka message the cache writer reads."""

    payload: bytes
    header: list[tuple[str, bytes]] | None
    at: int
    user: str

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return "recommendations"

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.at

    def value(self) -> bytes:
        return self.payload

    def key(self) -> bytes:
        return self.user.encode()

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self.header


class FakeCache:
    def __init__(self, outcomes: list[CasOutcome]) -> None:
        self.outcomes = outcomes

    def write_many(self, lists: list[tuple[str, int, bytes]]) -> list[CasOutcome]:
        assert len(lists) == len(self.outcomes)
        return self.outcomes


class FakeConsumer:
    def store_offsets(self, offsets: Any) -> None:
        self.stored = offsets


def record(user: str, offset: int, trigger_age_s: float, origin_ms: int | None) -> FakeRecord:
    recs = Recommendations(
        user_id=user,
        items=[ScoredItem(item_id="1", score=1.0)],
        profile_version=1,
        model=ModelRef(name="m", version="1"),
        variant="default",
        source="model",
        generated_at=datetime.now(UTC),
        trigger_ts=datetime.now(UTC) - timedelta(seconds=trigger_age_s),
    )
    header = None if origin_ms is None else [(ORIGIN_HEADER, b"%d" % origin_ms)]
    return FakeRecord(recs.model_dump_json().encode(), header, offset, user)


def counts() -> dict[str, tuple[float, float]]:
    """Per source label: (count, sum) of the freshness histogram."""
    out: dict[str, list[float]] = {}
    for family in CACHE_FRESHNESS.collect():
        for s in family.samples:
            if s.name.endswith(("_count", "_sum")):
                slot = out.setdefault(s.labels["source"], [0.0, 0.0])
                slot[0 if s.name.endswith("_count") else 1] = s.value
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_freshness_from_the_header_else_a_recent_trigger_and_never_for_stale_lists() -> None:
    writer = CacheWriter(CacheWriterSettings(cache_freshness_trigger_max_age_s=60))
    writer.consumer = FakeConsumer()  # type: ignore[assignment]  # no broker needed
    # Rounded down: an origin never lies in the writer's future, so the header's age is >= 2 s.
    now_ms = int(time.time() * 1000)
    messages = [
        record("a", 1, trigger_age_s=3600, origin_ms=now_ms - 2000),  # header wins: ~2 s
        record("b", 2, trigger_age_s=5, origin_ms=None),  # recent trigger: ~5 s
        record("c", 3, trigger_age_s=3600, origin_ms=None),  # old event (replay): not observed
        record("d", 4, trigger_age_s=1, origin_ms=now_ms - 1000),  # stale rejection: not observed
    ]
    written, stale = CasOutcome.WRITTEN, CasOutcome.STALE
    writer.cache = FakeCache([written, written, written, stale])  # type: ignore[assignment]
    before = counts()
    writer._write(messages)  # type: ignore[arg-type]  # fakes of confluent_kafka.Message
    after = counts()

    def delta(source: str) -> tuple[float, float]:
        c0, s0 = before.get(source, (0.0, 0.0))
        c1, s1 = after[source]
        return c1 - c0, s1 - s0

    header_n, header_sum = delta("header")
    trigger_n, trigger_sum = delta("trigger_ts")
    assert header_n == 1 and 2.0 <= header_sum < 3.0
    assert trigger_n == 1 and 5.0 <= trigger_sum < 6.0
    assert writer.written == 3 and writer.stale == 1
