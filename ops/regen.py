"""Re-run regeneration over a time range with another model, into a separate topic; compare.

The users are those with a ``ProfileChanged`` on ``profiles.changed`` between ``--from-time`` and
``--to-time`` (offsets-for-times on both ends). Each user's profile is read from Redis as the live
regeneration consumer reads it (:func:`streams.profile.read_profile`), the model answers in
batches, and each list is published to the output topic through the live consumer's own
regeneration core (:func:`consumers.model_history`, :class:`consumers.RecsPublisher`): the public
``Recommendations`` contract, key = user_id, ``variant`` = the replay variant. Profiles
are the current ones: Redis keeps no history, so a user changed since the range is regenerated
from their newer profile, exactly as the live consumer would do now. A model that blends recent
popularity gets the window the live service would hold after the range's latest change
(:class:`consumers.RecentCounts`).

The comparison pairs, per user, the list with the highest ``profile_version`` on each topic (the
latest on ties) and reports :class:`ops.compare.Comparison`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis
from confluent_kafka import KafkaError, Message
from pydantic import ValidationError
from tqdm import tqdm

from consumers import ItemTitles, RecentCounts, RecsPublisher, model_history
from inference.reasons import explain_lists
from inference.recommender import Recommender
from ops.compare import Comparison, compare
from ops.exceptions import ReplayError
from ops.settings import OpsSettings
from ops.topics import TopicReader
from recstream import security
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from schemas import ModelRef, ProfileChanged, Recommendations
from streams.profile import read_profile

__all__ = [
    "RegenReplay",
    "RegenStats",
    "changed_users",
    "compare_topics",
    "latest_lists",
]

log = logging.getLogger(__name__)


@dataclass
class RegenStats:
    users: int = 0
    published: int = 0
    missing_profiles: int = 0


def _records(
    settings: OpsSettings,
    topic: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    label: str = "",
    progress: bool = False,
) -> Iterable[Message]:
    with TopicReader(settings, topic) as reader:
        ranges = reader.plan(since=since, until=until)
        total = sum(r.count for r in ranges)
        with tqdm(
            total=total, desc=label or topic, unit="msg", file=sys.stderr, disable=not progress
        ) as bar:
            for batch in reader.read(
                ranges, settings.replay_batch_size, settings.replay_idle_timeout_s
            ):
                yield from batch
                bar.update(len(batch))


def changed_users(
    settings: OpsSettings,
    since: datetime,
    until: datetime,
    *,
    progress: bool = False,
) -> dict[str, ProfileChanged]:
    """User -> their newest valid ``ProfileChanged`` published in ``[since, until)``."""
    if until <= since:
        raise ReplayError("--to-time must be after --from-time")
    out: dict[str, ProfileChanged] = {}
    invalid = 0
    for message in _records(
        settings,
        settings.topic_profiles_changed,
        since=since,
        until=until,
        label="changes",
        progress=progress,
    ):
        try:
            change = ProfileChanged.model_validate_json(message.value() or b"")
        except ValidationError:
            invalid += 1
            continue
        seen = out.get(change.user_id)
        if seen is None or change.profile_version >= seen.profile_version:
            out[change.user_id] = change
    if invalid:
        log.warning("%d invalid messages on %s skipped", invalid, settings.topic_profiles_changed)
    return out


def latest_lists(
    settings: OpsSettings,
    topic: str,
    users: set[str] | None = None,
    *,
    progress: bool = False,
) -> dict[str, Recommendations]:
    """User -> the list with the highest profile_version on ``topic`` (the later one on ties)."""
    out: dict[str, Recommendations] = {}
    for message in _records(settings, topic, label=topic, progress=progress):
        try:
            recs = Recommendations.model_validate_json(message.value() or b"")
        except ValidationError:
            continue
        if users is not None and recs.user_id not in users:
            continue
        seen = out.get(recs.user_id)
        if seen is None or recs.profile_version >= seen.profile_version:
            out[recs.user_id] = recs
    return out


def item_lists(lists: Mapping[str, Recommendations]) -> dict[str, list[str]]:
    return {user: [i.item_id for i in recs.items] for user, recs in lists.items()}


def compare_topics(
    settings: OpsSettings,
    topic_a: str,
    topic_b: str,
    users: set[str] | None = None,
    *,
    progress: bool = False,
) -> Comparison:
    """Compare the latest list per user on two topics (restricted to ``users`` if given)."""
    a = latest_lists(settings, topic_a, users, progress=progress)
    b = latest_lists(settings, topic_b, users, progress=progress)
    return compare(item_lists(a), item_lists(b), settings.replay_k)


class RegenReplay:
    """Regenerates lists for a set of users with one model and publishes them to a topic."""

    def __init__(
        self,
        settings: OpsSettings,
        recommender: Recommender,
        model: ModelRef,
        *,
        progress: bool = False,
        redis_client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.recommender = recommender
        self.model = model
        self.progress = progress
        self.keys = Keys(settings.key_prefix)
        self.redis = redis_client or security.redis_client(settings)

    def run(self, changes: Mapping[str, ProfileChanged], out_topic: str) -> RegenStats:
        """Publish one list per user with a profile; returns once the broker has them all."""
        stats = RegenStats(users=len(changes))
        errors: list[Any] = []

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err)

        producer = idempotent_producer(self.settings, linger_ms=5)
        publisher = RecsPublisher(
            producer, out_topic, self.settings.replay_variant, ItemTitles(self.redis, self.keys)
        )
        self._use_recent(changes.values())
        users = sorted(changes)
        size = self.settings.replay_regen_batch_size
        with tqdm(
            total=len(users), desc="regen", unit="user", file=sys.stderr, disable=not self.progress
        ) as bar:
            for start in range(0, len(users), size):
                chunk = users[start : start + size]
                profiles = [(u, read_profile(self.redis, self.keys, u)) for u in chunk]
                present = [(u, p) for u, p in profiles if p is not None]
                stats.missing_profiles += len(chunk) - len(present)
                histories = [model_history(p) for _, p in present]
                ranked = self.recommender.recommend(histories, self.settings.replay_k)
                explained = explain_lists(self.recommender, histories, ranked)
                for n, ((user, profile), items) in enumerate(zip(present, ranked, strict=True)):
                    recs = publisher.build(
                        user,
                        items,
                        profile_version=profile.version,
                        model=self.model,
                        source="model",
                        trigger_ts=changes[user].trigger_ts,
                        reasons=explained[n] if explained is not None else None,
                    )
                    publisher.publish(recs, on_delivery=delivered)
                    stats.published += 1
                producer.poll(0)
                bar.update(len(chunk))
        left = producer.flush(30.0)
        if left or errors:
            raise ReplayError(
                f"{left} lists undelivered and {len(errors)} rejected by the broker"
                + (f": {errors[0]}" if errors else "")
            )
        return stats

    def _use_recent(self, changes: Iterable[ProfileChanged]) -> None:
        """Give a model that blends recent popularity the window the live service would hold
        after these changes: the stream worker's counts, ending on the latest change's day."""
        days = int(getattr(self.recommender, "recent_days", 0))
        use_recent = getattr(self.recommender, "use_recent", None)
        if days <= 0 or use_recent is None:
            return
        window = RecentCounts(self.redis, self.keys, days)
        for change in changes:
            window.saw(change.trigger_ts)
        use_recent(window.read())
