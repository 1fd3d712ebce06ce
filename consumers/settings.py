"""Settings of the consumers: the regeneration service, the cache writer, the embeddings publisher.

The rule of every service's settings: a field the service owns starts with the service's name,
so its variable is ``RECSTREAM_<SERVICE>_<SETTING>`` (``RECSTREAM_REGEN_METRICS_PORT``,
``RECSTREAM_CACHE_METRICS_PORT``) and no two services that `recstream run` starts from one
environment read the same name for different things; only the shared addresses, topics and key
prefix of :class:`recstream.settings.CommonSettings` are plain ``RECSTREAM_<SETTING>``. A
sub-model's fields add ``__`` and their own name: ``RECSTREAM_REGEN_POOL__WORKERS``. Command-line
flags (generated from these fields) override the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field

from inference.pool import PoolConfig
from inference.postprocess import PostConfig
from inference.settings import ArtifactTrust
from recstream.settings import CommonSettings

__all__ = ["CacheWriterSettings", "EmbeddingsSettings", "RegenSettings"]


class RegenSettings(CommonSettings):
    """The change-triggered regeneration consumer and its worker pool."""

    principal: ClassVar[str] = "regen"

    regen_group_id: str = Field("recstream-regen", description="Kafka consumer group.")
    regen_debounce_ms: float = Field(
        20.0,
        ge=0,
        description="Changes of one user within this window (from the first) coalesce into one "
        "regeneration on the latest profile version.",
    )
    regen_k: int = Field(10, ge=1, le=200, description="Items per recommendation list.")
    regen_trending_refresh_s: float = Field(
        5.0,
        gt=0,
        description="Seconds between reads of today's and yesterday's recent-popularity counts "
        "(older days of the window are read again every ten minutes).",
    )
    regen_returning_poll_s: float = Field(
        1.0,
        gt=0,
        description="Seconds between looks for returning users whose lists are due to be made "
        "again (when the served blend of recent popularity is for returning users only).",
    )
    regen_variant: str = Field(
        "default", min_length=1, max_length=64, description="A/B variant name."
    )
    regen_model_dir: Path | None = Field(
        None, description="Trained artifact folder (written by `recstream train`) to serve."
    )
    regen_artifact: ArtifactTrust = Field(
        default_factory=ArtifactTrust,
        description="Public keys the artifact must be signed by (RECSTREAM_ARTIFACT_VERIFY_KEY), "
        "and whether an unsigned one may be served.",
    )
    regen_pool: PoolConfig = Field(
        default_factory=PoolConfig, description="The worker pool that runs the model."
    )
    regen_post: PostConfig = Field(
        default_factory=PostConfig,
        description="Cosine floor and MMR on the model's candidates (needs the artifact's index).",
    )
    regen_max_pending_users: int = Field(
        10_000, ge=1, description="Users waiting in the debounce window before input pauses."
    )
    regen_drain_timeout_s: float = Field(
        30.0, gt=0, description="On shutdown, how long in-flight work may take to finish."
    )
    regen_max_message_bytes: int = Field(
        64 * 1024, ge=1024, description="A larger profiles.changed record is dead-lettered."
    )
    regen_delivery_timeout_ms: int = Field(
        30_000,
        ge=1000,
        description="How long the producer tries to deliver one list or dead letter (librdkafka "
        "message.timeout.ms) before it counts as a failed attempt.",
    )
    regen_delivery_attempts: int = Field(
        5,
        ge=1,
        description="Attempts to deliver one record, with doubling backoff between them; past "
        "them the service exits non-zero (the work's offsets were never stored).",
    )
    regen_retry_backoff_s: float = Field(
        0.2, gt=0, description="Backoff before the second delivery attempt (then doubling)."
    )
    regen_stats_interval_ms: int = Field(
        5000, ge=0, description="librdkafka statistics interval (consumer lag metric); 0 = off."
    )
    regen_redis_retry_s: float = Field(
        60.0,
        gt=0,
        description="How long profile reads may fail (Redis down or loading its AOF) before the "
        "service exits; meanwhile it keeps its partitions and its work.",
    )
    regen_metrics_host: str = Field("127.0.0.1", description="Address of /metrics and /healthz.")
    regen_metrics_port: int = Field(
        9102, ge=0, le=65535, description="Port of /metrics and /healthz; 0 = off."
    )


class CacheWriterSettings(CommonSettings):
    """The consumer that writes ``recommendations`` into Redis ``recs:{user}``."""

    principal: ClassVar[str] = "cache"

    cache_group_id: str = Field("recstream-cache-writer", description="Kafka consumer group.")
    cache_ttl_s: int = Field(
        7 * 24 * 3600, ge=1, description="Expiry of a cached recommendation list, seconds."
    )
    cache_batch_size: int = Field(500, ge=1, description="Messages written per Redis round trip.")
    cache_batch_wait_ms: float = Field(
        2.0, ge=0, description="Longest wait to fill a batch before writing what is there."
    )
    cache_freshness_trigger_max_age_s: float = Field(
        300.0,
        ge=0,
        description="For lists without a recs.origin_ts header, freshness is measured from the "
        "event's trigger_ts only when it is at most this old (live traffic; a replay of old "
        "events would otherwise report their age).",
    )
    cache_max_message_bytes: int = Field(
        256 * 1024, ge=1024, description="A larger recommendations record is dead-lettered."
    )
    cache_retry_budget_s: float = Field(
        30.0,
        gt=0,
        description="How long a failing Redis write (or dead-letter delivery) is retried, with "
        "doubling backoff, before the writer exits non-zero (the batch's offsets never stored).",
    )
    cache_delivery_timeout_ms: int = Field(
        10_000,
        ge=1000,
        description="How long the producer tries to deliver one dead letter (librdkafka "
        "message.timeout.ms) before it counts as a failed attempt.",
    )
    cache_stats_interval_ms: int = Field(
        5000, ge=0, description="librdkafka statistics interval (consumer lag metric); 0 = off."
    )
    cache_metrics_host: str = Field("127.0.0.1", description="Address of /metrics and /healthz.")
    cache_metrics_port: int = Field(
        9103, ge=0, le=65535, description="Port of /metrics and /healthz; 0 = off."
    )


class EmbeddingsSettings(CommonSettings):
    """The publisher of differentially private profile embeddings (``profiles.embeddings``)."""

    principal: ClassVar[str] = "embeddings"

    embeddings_group_id: str = Field("recstream-embeddings", description="Kafka consumer group.")
    embeddings_model_dir: Path | None = Field(
        None,
        description="Trained artifact folder whose item index (MiniLM vectors) embeds profiles; "
        "`recstream run` starts the service only when it is set.",
    )
    embeddings_epsilon: float = Field(
        1.0, gt=0, le=50, description="ε of one release (analytic Gaussian mechanism)."
    )
    embeddings_delta: float = Field(1e-5, gt=0, lt=1, description="δ of one release.")
    embeddings_clip_norm: float = Field(
        1.0, gt=0, description="L2 clip C of a profile embedding; the sensitivity is 2C."
    )
    embeddings_budget_epsilon: float = Field(
        10.0,
        gt=0,
        le=50,
        description="A user's total ε per window (zCDP composition at the budget δ); a release "
        "that would exceed it is not published.",
    )
    embeddings_budget_delta: float = Field(
        1e-5, gt=0, lt=1, description="δ at which a user's total ε is stated."
    )
    embeddings_budget_window_s: float = Field(
        30 * 24 * 3600.0,
        ge=0,
        description="Length of a budget window from a user's first release, seconds; 0 = the "
        "budget is for the user's lifetime.",
    )
    embeddings_max_message_bytes: int = Field(
        64 * 1024, ge=1024, description="A larger profiles.changed record is skipped."
    )
    embeddings_delivery_timeout_ms: int = Field(
        30_000,
        ge=1000,
        description="How long the producer tries to deliver a release (librdkafka "
        "message.timeout.ms); past it the service exits non-zero with its offsets not stored.",
    )
    embeddings_stats_interval_ms: int = Field(
        5000, ge=0, description="librdkafka statistics interval (consumer lag metric); 0 = off."
    )
    embeddings_metrics_host: str = Field(
        "127.0.0.1", description="Address of /metrics and /healthz."
    )
    embeddings_metrics_port: int = Field(
        9104, ge=0, le=65535, description="Port of /metrics and /healthz; 0 = off."
    )
