"""The one regeneration core: a stored profile in, a published ``Recommendations`` out.

The live consumer (:class:`consumers.regen.RegenService`, answers from the worker pool) and the
operator replay (:class:`ops.regen.RegenReplay`, answers from one model in batches) both turn a
changed user's profile into a model history with :func:`model_history`, and the model's answer
into the public message and its record with :class:`RecsPublisher`. Only where the answer comes
from and when it is published differ between them. Each item's reasons (the history items behind
it, from the model) travel in the message with their catalog titles, which :class:`ItemTitles`
reads from Redis once and keeps. :class:`RecentCounts` keeps the window of recent popularity a
model blends into short histories' lists (``inference.trending``), summed from the stream
worker's per-day counts.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal, NamedTuple

import redis
from confluent_kafka import KafkaError, Message, Producer

from consumers.metrics import (
    ORIGIN_HEADER,
    REGEN_TITLE_FAILURES,
    REGEN_TRENDING_FAILURES,
    REGEN_TRENDING_ITEMS,
)
from inference.reasons import ListReasons
from inference.recommender import Ranked
from recstream.keys import Keys
from schemas import HistoryReason, ModelRef, Profile, Recommendations, ScoredItem
from streams.trending import DAY_S, Window, day_of, read_counts

__all__ = [
    "ItemTitles",
    "RecentCounts",
    "Record",
    "RecsPublisher",
    "model_history",
    "origin_headers",
]

log = logging.getLogger(__name__)

OnDelivery = Callable[[KafkaError | None, Message], None]
Headers = list[tuple[str, str | bytes | None]]  # what confluent-kafka's produce() accepts


def model_history(profile: Profile) -> list[str]:
    """The history a model takes: the profile's recent items, oldest first."""
    return list(reversed(profile.recent_items))


def origin_headers(origin_ts: float | None) -> Headers | None:
    """The ``recs.origin_ts`` header (epoch milliseconds) passed on to the cache writer."""
    return None if origin_ts is None else [(ORIGIN_HEADER, b"%d" % round(origin_ts * 1000))]


class Record(NamedTuple):
    """One record to produce, kept whole so that a failed delivery can be sent again."""

    topic: str
    key: bytes | None
    value: bytes | None
    headers: Headers | None = None


class ItemTitles:
    """Catalog titles by item id, read from the catalog's ``item:{id}`` hashes and kept.

    Reasons name the same popular history items over and over, so after a warm-up a list's
    titles cost no round trip; the missing ones of a list are read in one pipeline. Entries
    expire after ``max_age_s`` (a reloaded catalog's titles show within it) and the least
    recently used go beyond ``capacity``. When Redis cannot answer, the list goes out with ids
    and empty titles rather than waiting: a title is a nicety, the list is not.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        capacity: int = 50_000,
        max_age_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client, self.keys = client, keys
        self.capacity, self.max_age_s, self.clock = capacity, max_age_s, clock
        self._held: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.refused = False  # the ACL refused the reads: titles stay empty

    def titles(self, item_ids: Iterable[str]) -> dict[str, str]:
        """``item_id -> title`` for each id (``""`` for one the catalog does not have)."""
        now = self.clock()
        out: dict[str, str] = {}
        missing: list[str] = []
        for item in dict.fromkeys(item_ids):
            held = self._held.get(item)
            if held is not None and now - held[1] < self.max_age_s:
                self._held.move_to_end(item)
                out[item] = held[0]
            else:
                missing.append(item)
        if missing:
            out.update(dict.fromkeys(missing, "") if self.refused else self._read(missing, now))
        return out

    def _read(self, items: list[str], now: float) -> dict[str, str]:
        pipe = self.client.pipeline(transaction=False)
        for item in items:
            pipe.hget(self.keys.item(item), "title")
        try:
            raw = pipe.execute()
        except redis.exceptions.NoPermissionError:
            # A deployment whose ACL predates reasons: ask once, not at every list.
            log.warning("catalog titles are not read: this principal may not read item hashes")
            self.refused = True
            return dict.fromkeys(items, "")
        except redis.RedisError as exc:
            REGEN_TITLE_FAILURES.inc()
            log.warning("catalog titles unavailable, reasons go out without them: %s", exc)
            return dict.fromkeys(items, "")
        read: dict[str, str] = {}
        for item, value in zip(items, raw, strict=True):
            title = value.decode("utf-8", "replace") if isinstance(value, bytes) else ""
            read[item] = title[:512]  # the contract's bound, whatever the catalog holds
            self._held[item] = (read[item], now)
            self._held.move_to_end(item)
        while len(self._held) > self.capacity:
            self._held.popitem(last=False)
        return read


class RecentCounts:
    """The recent-popularity counts of a ``days`` window, summed from the stream worker's
    per-day hashes (``Keys.trending``, ``streams.trending``) and kept.

    The window ends on the most common event day among the changes that arrived since the
    previous read (the later one on a tie; :meth:`saw`, fed with each change's ``trigger_ts``;
    the window stays where it was when none did), so a replay of old events is served the
    popularity of its own time, as live traffic is today's, and a few changes of another time
    among them (a conversation turn is stamped now) do not move it; a time more than a day ahead
    of the wall clock is not believed.
    The newest two days are read again every ``refresh_s``, older ones (settled: few events
    arrive that late) every ``settled_s`` (``streams.trending.Window``, which keeps the window's
    total as days are read, so a read costs the days read). When Redis cannot answer, the counts
    read before stay; when the ACL refuses them (a deployment that predates them), they are not
    asked again and the model serves without them.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        days: int,
        *,
        refresh_s: float = 5.0,
        settled_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client, self.keys, self.days = client, keys, days
        self.refresh_s = refresh_s
        self.clock, self.wall = clock, wall
        self.latest: int | None = None  # the window's last day, as of the latest read
        self._arriving: Counter[int] = Counter()  # the days of the changes since that read
        self._window = Window(days, refresh_s=refresh_s, settled_s=settled_s)
        self._read_at: float | None = None
        self.refused = False

    def saw(self, ts: datetime) -> None:
        """A change of this event time arrived: its day counts towards the next read's window."""
        self._arriving[day_of(min(ts.timestamp(), self.wall() + DAY_S))] += 1

    def due(self) -> bool:
        """Whether :meth:`read` would read anything now."""
        if self.refused or self.days <= 0 or (self.latest is None and not self._arriving):
            return False
        return self._read_at is None or self.clock() - self._read_at >= self.refresh_s

    def read(self) -> dict[str, int] | None:
        """The window's counts per item id, reading the days that are due; ``None`` when there
        is no window yet or Redis refused every read so far."""
        if self._arriving:
            self.latest = max(self._arriving.items(), key=lambda kv: (kv[1], kv[0]))[0]
            self._arriving.clear()
        if self.latest is None or self.days <= 0:
            return None
        now = self.clock()
        self._read_at = now
        self._window.move(self.latest)
        due = self._window.due(now)
        if due and not self.refused:
            self._read_days(due, now)
        total = self._window.counts()
        if total is not None:
            REGEN_TRENDING_ITEMS.set(len(total))
        return total

    def _read_days(self, days: list[int], now: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(self.keys.trending(day))
        try:
            raw = pipe.execute()
        except redis.exceptions.NoPermissionError:
            log.warning("recent popularity is not read: this principal may not read its counts")
            self.refused = True
            return
        except redis.RedisError as exc:
            REGEN_TRENDING_FAILURES.inc()
            log.warning("recent-popularity counts unavailable, the last ones stay: %s", exc)
            return
        for day, fields in zip(days, raw, strict=True):
            self._window.put(day, read_counts(fields), now)


class RecsPublisher:
    """Builds one user's ``Recommendations`` from a model's answer and produces it (key = user).

    With ``titles``, each item's reasons carry their catalog titles.
    """

    def __init__(
        self, producer: Producer, topic: str, variant: str, titles: ItemTitles | None = None
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.variant = variant
        self.titles = titles

    def build(
        self,
        user_id: str,
        ranked: Ranked,
        *,
        profile_version: int,
        model: ModelRef,
        source: Literal["model", "fallback"],
        trigger_ts: datetime,
        reasons: ListReasons | None = None,
    ) -> Recommendations:
        """The public message for one user's list, generated now; ``reasons`` holds why its items
        are there (history item ids, largest contribution first; recent popularity)."""
        because = self._reasons(ranked, reasons.history if reasons is not None else {})
        popular = reasons.popular_now() if reasons is not None else {}
        return Recommendations(
            user_id=user_id,
            items=[
                ScoredItem(
                    item_id=item,
                    score=score,
                    because=because.get(item, []),
                    popular=popular.get(item),
                )
                for item, score in ranked
            ],
            profile_version=profile_version,
            model=model,
            variant=self.variant,
            source=source,
            generated_at=datetime.now(UTC),
            trigger_ts=trigger_ts,
        )

    def _reasons(
        self, ranked: Ranked, because: Mapping[str, Sequence[str]]
    ) -> dict[str, list[HistoryReason]]:
        listed = {item: list(because[item]) for item, _ in ranked if because.get(item)}
        if not listed:
            return {}
        ids = [r for reasons in listed.values() for r in reasons]
        titles = self.titles.titles(ids) if self.titles is not None else {}
        return {
            item: [HistoryReason(item_id=r, title=titles.get(r, "")) for r in reasons]
            for item, reasons in listed.items()
        }

    def record(self, recs: Recommendations, origin_ts: float | None = None) -> Record:
        """The output record of ``recs``: keyed by its user, with the origin header if known."""
        return Record(
            self.topic,
            recs.user_id.encode(),
            recs.model_dump_json().encode(),
            origin_headers(origin_ts),
        )

    def publish(
        self,
        recs: Recommendations,
        origin_ts: float | None = None,
        on_delivery: OnDelivery | None = None,
    ) -> None:
        """Queue ``recs`` (from :meth:`build`) for the output topic; ``on_delivery`` hears the
        broker's answer."""
        topic, key, value, headers = self.record(recs, origin_ts)
        self.producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
