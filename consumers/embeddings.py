"""The embeddings publisher: ``profiles.changed`` in, differentially private vectors out.

Analytics may consume users' profile embeddings; they are the user-derived vectors that leave the
trust boundary, so each is released through the Gaussian mechanism of :mod:`inference.privacy`
on its own topic (``profiles.embeddings``, key = user_id, :class:`schemas.embeddings.
ProfileEmbedding`). For every change notice the service reads the stored profile, embeds it as
the weighted mean of its items' MiniLM vectors (the served artifact's item index, verified at
start), clips it, adds noise from the OS CSPRNG, asks the user's :class:`~inference.privacy.
PrivacyLedger` for the budget, and publishes what the ledger grants.

- **One release per profile version**: the ledger records the last released version; a notice
  for that version or an older one publishes nothing (``duplicate``). Notices are answered with
  the stored profile's version, so a burst of notices costs one release.
- **Budget before publishing**: the spend is recorded in Redis (one Lua script) before the
  release goes out; a release that would take the user past the budget is not published
  (``over_budget``). The granted vector is kept in the ledger until its delivery is confirmed, so
  a crash in between publishes the same vector again on redelivery, at no further cost.
- **At-least-once**: offsets are stored after the poll batch's releases are delivered; a release
  the broker does not take within ``embeddings_delivery_timeout_ms`` stops the service non-zero
  with the batch's offsets not stored.
- **Skipped**: a record that is not a ``ProfileChanged`` keyed by its user, a notice whose
  profile is gone, malformed or behind the notice, or a profile with no item in the index is
  skipped and counted (``recs_embeddings_skipped_total{reason}``). The regeneration service
  dead-letters the same records from the same topic; a second dead letter would make a replay
  of ``profiles.changed.dlq`` deliver them twice.

Embedding a profile is a weighted mean of at most a few hundred stored vectors: microseconds of
numpy, no model and no FAISS search in the poll loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic import ValidationError

from consumers.deadletter import RecordRefusedError, decode
from consumers.exceptions import DeliveryError
from consumers.messages import at_least_once_consumer, commit_stored, position
from consumers.metrics import (
    EMBEDDINGS_NOTICES,
    EMBEDDINGS_PUBLISH_ERRORS,
    EMBEDDINGS_SKIPPED,
    EMBEDDINGS_USER_EPSILON,
)
from consumers.settings import EmbeddingsSettings
from inference.exceptions import InferenceError
from inference.privacy import (
    MECHANISM,
    GaussianMechanism,
    GrantOutcome,
    PrivacyLedger,
    epsilon_to_rho,
    rho_to_epsilon,
)
from recstream import security
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from schemas import Profile, ProfileChanged
from schemas.embeddings import ProfileEmbedding
from streams.profile import read_profile

__all__ = ["EmbeddingsService", "ItemVectors"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemVectors:
    """The served artifact's item embeddings, one row per item id (unit-length MiniLM vectors)."""

    rows: Mapping[str, int]
    matrix: npt.NDArray[np.float32]

    @classmethod
    def from_artifact(cls, folder: Path) -> ItemVectors:
        """Verify the artifact's manifest, then read its FAISS item index into memory."""
        from inference.artifact import read_item_index

        # Built from the verified bytes: the index is never reopened after the check.
        index = read_item_index(folder)
        matrix = index.vectors(index.item_ids)
        return cls({item: row for row, item in enumerate(index.item_ids)}, matrix)

    def embed(self, profile: Profile) -> npt.NDArray[np.float32] | None:
        """The profile's embedding: its items' vectors weighted by their decayed weights.

        ``None`` when no item of the profile is in the index or the weights leave nothing.
        """
        from inference.embeddings import profile_embedding

        known = [(self.rows[i], w) for i, w in profile.item_weights.items() if i in self.rows]
        if not known:
            return None
        rows, weights = zip(*known, strict=True)
        try:
            return profile_embedding(self.matrix[list(rows)], list(weights))
        except InferenceError:
            return None


@dataclass(frozen=True)
class _Release:
    user_id: str
    version: int
    payload: bytes


class EmbeddingsService:
    """Consumes profile changes, publishes (ε, δ)-DP profile embeddings within each budget."""

    def __init__(
        self,
        settings: EmbeddingsSettings,
        vectors: ItemVectors,
        redis_client: redis.Redis | None = None,
    ) -> None:
        self.settings = settings
        self.vectors = vectors
        self.keys = Keys(settings.key_prefix)
        self.redis = redis_client or security.redis_client(settings)
        self.mechanism = GaussianMechanism(
            settings.embeddings_epsilon, settings.embeddings_delta, settings.embeddings_clip_norm
        )
        budget_rho = epsilon_to_rho(
            settings.embeddings_budget_epsilon, settings.embeddings_budget_delta
        )
        if budget_rho < self.mechanism.rho:
            raise InferenceError(
                f"the budget (ε {settings.embeddings_budget_epsilon}) is smaller than one "
                f"release (ε {settings.embeddings_epsilon}): nothing could ever be published"
            )
        self.ledger = PrivacyLedger(
            self.redis, self.keys, budget_rho, settings.embeddings_budget_window_s
        )
        self._stop = threading.Event()
        self._failure: DeliveryError | None = None
        self._delivered: list[_Release] = []
        self._produced: set[tuple[str, int]] = set()  # (user, version) sent in this batch
        self.running = threading.Event()  # set once subscribed; for health checks and tests
        self.consumer: Consumer = at_least_once_consumer(
            settings,
            settings.embeddings_group_id,
            settings.embeddings_stats_interval_ms,
            settings.group_instance_id,
        )
        self.producer = idempotent_producer(
            settings,
            linger_ms=1,
            message_timeout_ms=settings.embeddings_delivery_timeout_ms,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish (safe to call from a signal handler or another thread)."""
        self._stop.set()

    def run(self) -> None:
        """Consume until :meth:`stop`; a batch's offsets are stored once its releases are out."""
        self.consumer.subscribe([self.settings.topic_profiles_changed], on_revoke=self._on_revoke)
        self.running.set()
        try:
            while not self._stop.is_set():
                self._step()
        finally:
            self.running.clear()
            self.producer.flush(10.0)
            commit_stored(self.consumer)
            self.consumer.close()
            log.info("embeddings publisher closed")

    def _step(self) -> None:
        first = self.consumer.poll(0.1)
        if first is None:
            return
        messages = [first, *self.consumer.consume(499, timeout=0)]
        done: dict[tuple[str, int], int] = {}
        for message in messages:
            where = position(message)
            if where is None:
                continue
            topic, partition, offset = where
            EMBEDDINGS_NOTICES.labels("in").inc()
            self._handle(message)
            done[(topic, partition)] = max(done.get((topic, partition), -1), offset)
        self._flush()
        self._store(done)

    # -- one notice ----------------------------------------------------------------------------

    def _skip(self, reason: str, message: Message, detail: str) -> None:
        EMBEDDINGS_SKIPPED.labels(reason).inc()
        EMBEDDINGS_NOTICES.labels("skipped").inc()
        log.info(
            "skipped %s/%s@%s: %s: %s",
            message.topic(),
            message.partition(),
            message.offset(),
            reason,
            detail,
        )

    def _handle(self, message: Message) -> None:
        try:
            change = decode(
                ProfileChanged,
                message.key(),
                message.value(),
                self.settings.embeddings_max_message_bytes,
            )
        except RecordRefusedError as refused:
            self._skip(str(refused.reason), message, refused.detail)
            return
        try:
            profile = read_profile(self.redis, self.keys, change.user_id)
        except (KeyError, ValueError, ValidationError) as exc:  # a stored profile off its layout
            self._skip("bad_profile", message, type(exc).__name__)
            return
        if profile is None:
            self._skip("no_profile", message, "no stored profile")
            return
        if change.profile_version > profile.version:
            detail = f"profile_version {change.profile_version} > stored {profile.version}"
            self._skip("version_ahead", message, detail)
            return
        if profile.version < 1:
            self._skip("no_profile", message, "profile version 0")
            return
        embedding = self.vectors.embed(profile)
        if embedding is None:
            self._skip("no_known_items", message, "no profile item is in the item index")
            return
        self._release(profile, embedding)

    def _release(self, profile: Profile, embedding: npt.NDArray[np.float32]) -> None:
        mech = self.mechanism
        release = ProfileEmbedding(
            user_id=profile.user_id,
            profile_version=profile.version,
            vector=mech.privatize(embedding).tolist(),
            epsilon=mech.epsilon,
            delta=mech.delta,
            clip_norm=mech.clip_norm,
            sigma=mech.sigma,
            mechanism=MECHANISM,
            generated_at=datetime.now(UTC),
        )
        payload = release.model_dump_json().encode()
        grant = self.ledger.spend(profile.user_id, profile.version, mech.rho, payload)
        sent = (profile.user_id, profile.version) in self._produced
        if grant.outcome is GrantOutcome.DUPLICATE or sent:  # sent: pending within this batch
            EMBEDDINGS_NOTICES.labels("duplicate").inc()
            return
        if grant.outcome is GrantOutcome.REFUSED:
            EMBEDDINGS_NOTICES.labels("over_budget").inc()
            return
        if grant.outcome is GrantOutcome.GRANTED:
            spent = rho_to_epsilon(grant.spent_rho, self.settings.embeddings_budget_delta)
            EMBEDDINGS_USER_EPSILON.observe(spent)
        assert grant.payload is not None  # granted or pending: the ledger returns what to send
        self._produced.add((profile.user_id, profile.version))
        self._produce(_Release(profile.user_id, profile.version, grant.payload))

    # -- delivery --------------------------------------------------------------------------

    def _produce(self, release: _Release) -> None:
        def delivered(err: KafkaError | None, _msg: Message) -> None:
            if err is None:
                self._delivered.append(release)
            else:
                self._failed(str(err))

        try:
            self.producer.produce(
                self.settings.topic_profile_embeddings,
                key=release.user_id.encode(),
                value=release.payload,
                on_delivery=delivered,
            )
        except (BufferError, KafkaException) as exc:
            self._failed(str(exc))

    def _failed(self, error: str) -> None:
        EMBEDDINGS_PUBLISH_ERRORS.inc()
        self._failure = self._failure or DeliveryError(
            f"a release to {self.settings.topic_profile_embeddings!r} was not delivered: {error}"
        )

    def _flush(self) -> None:
        """Wait for the batch's releases (librdkafka retries up to the delivery timeout)."""
        timeout = self.settings.embeddings_delivery_timeout_ms / 1000.0 + 5.0
        left = self.producer.flush(timeout)
        if left and self._failure is None:
            self._failed(f"{left} releases still queued after {timeout:.0f} s")
        for release in self._delivered:
            self.ledger.confirm(release.user_id, release.version)
            EMBEDDINGS_NOTICES.labels("published").inc()
        self._delivered.clear()
        self._produced.clear()
        if self._failure is not None:
            raise self._failure  # the batch's offsets were never stored: a restart redoes it

    def _store(self, done: dict[tuple[str, int], int]) -> None:
        offsets = [TopicPartition(t, p, offset + 1) for (t, p), offset in done.items()]
        if offsets:
            try:
                self.consumer.store_offsets(offsets=offsets)
            except KafkaException as exc:  # partition revoked meanwhile: the new owner re-reads
                log.info("offsets not stored: %s", exc)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        commit_stored(consumer)

    # -- health ------------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        detail = {
            "consuming": self.running.is_set(),
            "failure": None if self._failure is None else str(self._failure),
            "epsilon": self.mechanism.epsilon,
            "sigma": self.mechanism.sigma,
        }
        return self.running.is_set() and self._failure is None, detail
