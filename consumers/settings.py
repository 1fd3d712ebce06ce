"""Settings of the consumers: the regeneration service and the cache writer.

Every field reads ``RECSTREAM_<FIELD>`` from the environment (e.g. ``RECSTREAM_DEBOUNCE_MS``,
``RECSTREAM_METRICS_PORT``); command-line flags override them. Each service has one class.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from recstream.settings import CommonSettings

__all__ = ["CacheWriterSettings", "RegenSettings"]


class RegenSettings(CommonSettings):
    """The change-triggered regeneration consumer and its worker pool."""

    regen_group_id: str = Field("recstream-regen", description="Kafka consumer group.")
    debounce_ms: float = Field(
        20.0,
        ge=0,
        description="Changes of one user within this window (from the first) coalesce into one "
        "regeneration on the latest profile version.",
    )
    recs_k: int = Field(10, ge=1, le=200, description="Items per recommendation list.")
    variant: str = Field("default", min_length=1, max_length=64, description="A/B variant name.")
    dataset: str = Field(
        "ml-100k", description="Dataset (name or folder) giving the catalog and the fallback."
    )
    model_dir: Path | None = Field(
        None, description="Trained artifact folder; without one a co-occurrence CF model serves."
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="Pool worker processes; unset = one per GPU when CUDA is present, else 1.",
    )
    threads_per_worker: int = Field(
        1, ge=1, description="torch threads per worker (clamped to cores / workers)."
    )
    max_batch_size: int = Field(32, ge=1, description="Largest batch a worker gets.")
    max_wait_ms: float = Field(2.0, ge=0, description="Longest wait to fill a partial batch.")
    queue_size: int = Field(256, ge=1, description="Pool request queue bound.")
    request_timeout_s: float = Field(
        2.0, gt=0, description="A request unanswered this long gets the fallback list."
    )
    max_pending_users: int = Field(
        10_000, ge=1, description="Users waiting in the debounce window before input pauses."
    )
    drain_timeout_s: float = Field(
        30.0, gt=0, description="On shutdown, how long in-flight work may take to finish."
    )
    stats_interval_ms: int = Field(
        5000, ge=0, description="librdkafka statistics interval (consumer lag metric); 0 = off."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics and /healthz.")
    metrics_port: int = Field(
        9102, ge=0, le=65535, description="Port of /metrics and /healthz; 0 = off."
    )


class CacheWriterSettings(CommonSettings):
    """The consumer that writes ``recommendations`` into Redis ``recs:{user}``."""

    cache_group_id: str = Field("recstream-cache-writer", description="Kafka consumer group.")
    recs_ttl_s: int = Field(
        7 * 24 * 3600, ge=1, description="Expiry of a cached recommendation list, seconds."
    )
    cache_batch_size: int = Field(500, ge=1, description="Messages written per Redis round trip.")
    cache_batch_wait_ms: float = Field(
        2.0, ge=0, description="Longest wait to fill a batch before writing what is there."
    )
    freshness_trigger_max_age_s: float = Field(
        300.0,
        ge=0,
        description="For lists without a recs.origin_ts header, freshness is measured from the "
        "event's trigger_ts only when it is at most this old (live traffic; a replay of old "
        "events would otherwise report their age).",
    )
    stats_interval_ms: int = Field(
        5000, ge=0, description="librdkafka statistics interval (consumer lag metric); 0 = off."
    )
    metrics_host: str = Field("127.0.0.1", description="Address of /metrics and /healthz.")
    metrics_port: int = Field(
        9103, ge=0, le=65535, description="Port of /metrics and /healthz; 0 = off."
    )
