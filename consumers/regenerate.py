"""The one regeneration core: a stored profile in, a published ``Recommendations`` out.

The live consumer (:class:`consumers.regen.RegenService`, answers from the worker pool) and the
operator replay (:class:`ops.regen.RegenReplay`, answers from one model in batches) both turn a
changed user's profile into a model history with :func:`model_history`, and the model's answer
into the public message and its record with :class:`RecsPublisher`. Only where the answer comes
from and when it is published differ between them.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal, NamedTuple

from confluent_kafka import KafkaError, Message, Producer

from consumers.metrics import ORIGIN_HEADER
from inference.recommender import Ranked
from schemas import ModelRef, Profile, Recommendations, ScoredItem

__all__ = ["Record", "RecsPublisher", "model_history", "origin_headers"]

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


class RecsPublisher:
    """Builds one user's ``Recommendations`` from a model's answer and produces it (key = user)."""

    def __init__(self, producer: Producer, topic: str, variant: str) -> None:
        self.producer = producer
        self.topic = topic
        self.variant = variant

    def build(
        self,
        user_id: str,
        ranked: Ranked,
        *,
        profile_version: int,
        model: ModelRef,
        source: Literal["model", "fallback"],
        trigger_ts: datetime,
    ) -> Recommendations:
        """The public message for one user's list, generated now."""
        return Recommendations(
            user_id=user_id,
            items=[ScoredItem(item_id=item, score=score) for item, score in ranked],
            profile_version=profile_version,
            model=model,
            variant=self.variant,
            source=source,
            generated_at=datetime.now(UTC),
            trigger_ts=trigger_ts,
        )

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
