"""The progress the fold records beside the profiles, computed by the batch handler in memory.

Redis is replaced by a recorder of what the script is asked to store; the real script is tested
against Redis in tests/integration/test_streams_durability.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any

import orjson
import redis.asyncio

from recstream.keys import Keys
from schemas import Envelope
from streams import ProfileFolder
from streams.fold import Folded, Progress, pending_notice
from streams.settings import StreamsSettings

TOPIC = "clicks"


def record(partition: int, offset: int, user: str, eid: str, *, bad: bool = False) -> Envelope:
    body = {
        "schema_version": 1,
        "event_id": eid,
        "type": "click",
        "user_id": user,
        "item_id": "i",
        "ts": "2024-01-01T00:00:00Z",
    }
    value = b"{not json" if bad else orjson.dumps(body)
    return Envelope(TOPIC, partition, offset, user.encode(), value, (), 1_700_000_000_000)


class RecordingScript:
    """Stands in for the fold script: records each call's progress, every user changes."""

    def __init__(self, events: list[str]) -> None:
        self.progress: list[Progress | None] = []
        self.events = events

    async def run(
        self,
        groups: Mapping[str, Sequence[tuple[Any, ...]]],
        progress: Progress | None = None,
        fields: Mapping[str, Any] | None = None,
    ) -> list[Folded]:
        self.events.append("fold")
        self.progress.append(progress)
        return [
            Folded(user, 3, len(evs), 0, 0, True, 0.5, evs[-1][0], evs[-1][2], ("i",))
            for user, evs in groups.items()
        ]


def test_offsets_cover_every_record_and_dead_letters_are_confirmed_before_the_fold() -> None:
    events: list[str] = []
    settings = StreamsSettings(topic_clickstream=TOPIC)

    async def go() -> RecordingScript:
        loop = asyncio.get_running_loop()
        delivery: asyncio.Future[None] = loop.create_future()

        async def send_dlq(**_: object) -> asyncio.Future[None]:
            events.append("dead letter sent")
            return delivery

        async def send_changed(**_: object) -> None:
            events.append("notice sent")

        def confirm() -> None:
            events.append("dead letter confirmed")
            delivery.set_result(None)

        client = redis.asyncio.Redis()
        folder = ProfileFolder(settings, client, send_dlq, send_changed, group="g")
        script = RecordingScript(events)
        folder.script = script  # type: ignore[assignment]  # a recorder instead of Redis
        loop.call_later(0.05, confirm)
        await folder.handle(
            [
                record(0, 10, "a", "e1"),
                record(1, 4, "b", "e2"),
                record(0, 11, "a", "e3"),
                # Last in partition 1 and dead-lettered: the offset still moves past it, so
                # its letter must be confirmed before the fold stores that offset.
                record(1, 5, "b", "e4", bad=True),
            ]
        )
        await client.aclose()
        return script

    script = asyncio.run(go())
    assert events[:3] == ["dead letter sent", "dead letter confirmed", "fold"]
    (progress,) = script.progress
    assert progress is not None
    keys = Keys(settings.key_prefix)
    assert progress.offsets_key == keys.stream_offsets("g")
    # Unknown to this fresh worker what Redis holds (-1): the first fold checks nothing.
    assert sorted(progress.offsets) == [(f"{TOPIC}:0", 12, -1), (f"{TOPIC}:1", 6, -1)]
    assert progress.notices == {
        "a": (keys.pending_changes("g", TOPIC, 0), f"{TOPIC}:0", 10, 1_700_000_000_000),
        "b": (keys.pending_changes("g", TOPIC, 1), f"{TOPIC}:1", 4, 1_700_000_000_000),
    }


def test_the_next_fold_expects_what_the_last_one_stored_held_at_refused_users() -> None:
    settings = StreamsSettings(topic_clickstream=TOPIC)

    class RefusingScript(RecordingScript):
        async def run(
            self,
            groups: Mapping[str, Sequence[tuple[Any, ...]]],
            progress: Progress | None = None,
            fields: Mapping[str, Any] | None = None,
        ) -> list[Folded]:
            rows = await super().run(groups, progress)
            return [Folded.refused(r.user_id, "WRONGTYPE") if r.user_id == "x" else r for r in rows]

    async def go() -> RecordingScript:
        async def send(**_: object) -> None:
            return None

        client = redis.asyncio.Redis()
        folder = ProfileFolder(settings, client, send, send, group="g")
        script = RefusingScript([])
        folder.script = script  # type: ignore[assignment]  # a recorder instead of Redis
        await folder.handle([record(0, 20, "a", "e1"), record(0, 21, "x", "e2")])
        await folder.handle([record(0, 22, "a", "e3"), record(1, 7, "b", "e4")])
        await client.aclose()
        return script

    first, second = asyncio.run(go()).progress
    assert first is not None and second is not None
    # The first fold stored 22 for partition 0, held at 21 by the refused user x: the second
    # fold expects 21 there and nothing known for partition 1.
    assert sorted(second.offsets) == [(f"{TOPIC}:0", 23, 21), (f"{TOPIC}:1", 8, -1)]


def test_a_pending_notice_reads_back_as_the_fold_decided_it() -> None:
    row = ["u:1", 4, 2, 1, 0, 1, "0.25", "e9", "1700000000.5", 0, "i1", "i2"]
    # Stored as [version, origin_ms, row...] (fold.lua): the version first for a cheap compare.
    assert pending_notice(orjson.dumps([4, 1_700_000_000_123, *row])) == (
        1_700_000_000_123,
        Folded.from_row(row),
    )
    assert pending_notice(orjson.dumps([4, None, *row]))[0] is None
