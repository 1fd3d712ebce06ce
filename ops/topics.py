"""Reading a bounded slice of a topic's history: plan per-partition offset ranges, then read them.

A replay never follows a topic forever: its end offsets are the high watermarks captured when it
starts (or the offsets of a ``--to-time``), so what it reads is fixed and a progress bar can show
an ETA. Start offsets come from the low watermarks (``--from-beginning``) or from the broker's
offsets-for-times index (``--from-time``). The reader uses manual assignment and no consumer
group, so it commits nothing and disturbs no live consumer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import partial

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from ops.exceptions import ReplayError
from recstream.kafka import retrying
from recstream.security import kafka_config
from recstream.settings import CommonSettings

__all__ = ["PartitionRange", "TopicReader"]


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one partition."""

    partition: int
    start: int
    end: int

    @property
    def count(self) -> int:
        return max(0, self.end - self.start)


class TopicReader:
    """A group-less consumer that plans and reads offset ranges of one topic."""

    def __init__(self, settings: CommonSettings, topic: str, timeout_s: float = 10.0) -> None:
        self.topic = topic
        self.timeout_s = timeout_s
        self.consumer = Consumer(
            {
                **kafka_config(settings),
                # Required by librdkafka even for manual assignment; nothing is ever committed.
                "group.id": f"recstream-replay-{uuid.uuid4().hex[:12]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
            }
        )

    def close(self) -> None:
        self.consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning ----------------------------------------------------------------------------

    def partitions(self) -> list[int]:
        try:
            meta = self.consumer.list_topics(self.topic, timeout=self.timeout_s)
        except KafkaException as exc:
            raise ReplayError(f"cannot read metadata of {self.topic!r}: {exc}") from exc
        info = meta.topics.get(self.topic)
        if info is None or info.error is not None or not info.partitions:
            raise ReplayError(f"topic {self.topic!r} does not exist")
        return sorted(info.partitions)

    def watermarks(self) -> dict[int, tuple[int, int]]:
        """Partition -> (low, high) watermark offsets, now."""
        out: dict[int, tuple[int, int]] = {}
        for p in self.partitions():
            try:
                ask = partial(
                    self.consumer.get_watermark_offsets,
                    TopicPartition(self.topic, p),
                    timeout=self.timeout_s,
                )
                low, high = retrying(ask, self.timeout_s)
            except KafkaException as exc:
                raise ReplayError(f"cannot read offsets of {self.topic}/{p}: {exc}") from exc
            out[p] = (int(low), int(high))
        return out

    def offsets_at(self, when: datetime, highs: Mapping[int, int]) -> dict[int, int]:
        """Partition -> first offset whose timestamp is at or after ``when`` (else the high)."""
        ms = int(when.timestamp() * 1000)
        query = [TopicPartition(self.topic, p, ms) for p in sorted(highs)]
        try:
            found = retrying(
                lambda: self.consumer.offsets_for_times(query, timeout=self.timeout_s),
                self.timeout_s,
            )
        except KafkaException as exc:
            raise ReplayError(f"offsets-for-times failed on {self.topic}: {exc}") from exc
        # -1: no record at or after the time, i.e. the slice starts (or ends) at the end.
        return {tp.partition: tp.offset if tp.offset >= 0 else highs[tp.partition] for tp in found}

    def plan(
        self, since: datetime | None = None, until: datetime | None = None
    ) -> list[PartitionRange]:
        """Ranges from ``since`` (or the beginning) to ``until`` (or the current end)."""
        marks = self.watermarks()
        highs = {p: high for p, (_, high) in marks.items()}
        starts = {p: low for p, (low, _) in marks.items()}
        if since is not None:
            starts = self.offsets_at(since, highs)
        ends = highs if until is None else self.offsets_at(until, highs)
        return [PartitionRange(p, starts[p], max(starts[p], ends[p])) for p in sorted(marks)]

    # -- reading -----------------------------------------------------------------------------

    def read(
        self, ranges: list[PartitionRange], batch_size: int, idle_timeout_s: float
    ) -> Iterator[list[Message]]:
        """Yield batches of the records in ``ranges``, each partition in offset order.

        Raises :class:`ReplayError` when nothing arrives for ``idle_timeout_s`` while records
        are still due (an unreachable broker surfaces instead of a loop that spins).
        """
        todo = {r.partition: r for r in ranges if r.count > 0}
        if not todo:
            return
        self.consumer.assign([TopicPartition(self.topic, p, r.start) for p, r in todo.items()])

        def finish(partition: int) -> None:
            if todo.pop(partition, None) is not None:
                self.consumer.pause([TopicPartition(self.topic, partition)])

        last_progress = time.monotonic()
        try:
            while todo:
                batch: list[Message] = []
                for message in self.consumer.consume(batch_size, timeout=0.5):
                    partition = message.partition()
                    assert partition is not None
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            # The log ends before the planned end (records deleted or
                            # control records): nothing more will come for this range.
                            finish(partition)
                            continue
                        raise ReplayError(f"reading {self.topic}/{partition}: {error}")
                    wanted = todo.get(partition)
                    offset = message.offset()
                    assert offset is not None
                    if wanted is None or offset >= wanted.end:
                        finish(partition)
                        continue
                    batch.append(message)
                    if offset + 1 >= wanted.end:
                        finish(partition)
                now = time.monotonic()
                if batch:
                    last_progress = now
                    yield batch
                elif now - last_progress > idle_timeout_s:
                    left = ", ".join(str(p) for p in sorted(todo))
                    raise ReplayError(
                        f"no records from {self.topic} partitions {left} for "
                        f"{idle_timeout_s:.0f}s before their end offsets"
                    )
        finally:
            self.consumer.unassign()
