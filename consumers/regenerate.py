"""The one regeneration core: a stored profile in, a published ``Recommendations`` out.

The live consumer (:class:`consumers.regen.RegenService`, answers from the worker pool) and the
operator replay (:class:`ops.regen.RegenReplay`, answers from one model in batches) both turn a
changed user's profile into a model history with :func:`model_history`, and the model's answer
into the public message and its record with :class:`RecsPublisher`. Only where the answer comes
from and when it is published differ between them. Each item's reasons (the history items behind
it, from the model) travel in the message with their catalog titles, which :class:`ItemTitles`
reads from Redis once and keeps.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal, NamedTuple

import redis
from confluent_kafka import KafkaError, Message, Producer

from consumers.metrics import ORIGIN_HEADER, REGEN_TITLE_FAILURES
from inference.recommender import Ranked
from recstream.keys import Keys
from schemas import HistoryReason, ModelRef, Profile, Recommendations, ScoredItem

__all__ = ["ItemTitles", "Record", "RecsPublisher", "model_history", "origin_headers"]

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
        because: Mapping[str, Sequence[str]] | None = None,
    ) -> Recommendations:
        """The public message for one user's list, generated now; ``because`` holds each item's
        reasons (history item ids, largest contribution first)."""
        reasons = self._reasons(ranked, because or {})
        return Recommendations(
            user_id=user_id,
            items=[
                ScoredItem(item_id=item, score=score, because=reasons.get(item, []))
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
