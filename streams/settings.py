"""Settings of the stream processor (``recstream serve streams``) and its data tools.

The worker's own fields start with ``streams_`` and read ``RECSTREAM_STREAMS_<SETTING>`` (e.g.
``RECSTREAM_STREAMS_METRICS_PORT``), the rule of every service's settings (recstream/settings.py).
The fold's rules (``profile_*``, ``weight_*``, ``dwell_cap_ms``, ``event_max_future_s``) keep the
names of what they describe because the profile rebuild (`recstream replay profiles`) reads them
too, so a rebuild folds exactly as the live worker does. Command-line flags, generated from these
fields, override the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from recstream.settings import CommonSettings


class StreamsSettings(CommonSettings):
    """The Faust worker that folds clickstream events into Redis profiles."""

    principal: ClassVar[str] = "streams"

    streams_app_id: str = Field(
        "recstream-streams", description="Faust app id; also the Kafka consumer group."
    )
    streams_batch_size: int = Field(2000, ge=1, description="Events folded per Redis call (max).")
    streams_batch_within_s: float = Field(
        0.05, gt=0, description="Longest wait to fill a batch before folding what is there."
    )
    streams_metrics_port: int = Field(
        0, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 = off."
    )
    streams_web_port: int = Field(
        0, ge=0, le=65535, description="Port of Faust's own web server; 0 = off."
    )
    streams_lag_interval_s: float = Field(
        5.0, gt=0, description="Seconds between consumer lag reports (recs_consumer_lag_messages)."
    )
    streams_session_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Kafka group session timeout: how soon a dead worker's partitions move on.",
    )
    streams_redis_retry_s: float = Field(
        30.0, gt=0, description="How long Redis may stay unreachable before the worker fails."
    )
    streams_delivery: Literal["agent", "batch"] = Field(
        "agent",
        description="agent: a Faust agent reads the clickstream with stream.take_events; batch: "
        "the consumer hands each poll's records to the fold directly (streams/consumer.py).",
    )
    streams_fast_drain: bool = Field(
        True, description="Deliver fetched records without a task each (streams/consumer.py)."
    )
    streams_lean_monitor: bool = Field(
        True, description="Skip Faust's per-record monitor bookkeeping (streams/sensors.py)."
    )
    streams_event_loop: Literal["asyncio", "uvloop"] = Field(
        "uvloop", description="Event loop of the worker; uvloop roughly halves loop overhead."
    )
    streams_datadir: Path = Field(
        Path.home() / ".cache" / "recstream" / "faust",
        description="Where the Faust worker keeps its local state folder.",
    )
    streams_loglevel: str = Field("info", description="Worker log level.")
    streams_progress_check_s: float = Field(
        5.0,
        gt=0,
        description="Seconds between checks that Redis still holds the offsets this worker stored "
        "(a Redis that came back older stops the worker even when no record arrives).",
    )
    streams_fault_kill_before_announce: bool = Field(
        False,
        description="Fault injection only (durability tests): the worker SIGKILLs itself after "
        "the first fold that decides a change notice, before announcing it. Never set it in a "
        "deployment.",
    )
    streams_trending_keep_days: int = Field(
        35,
        ge=0,
        le=366,
        description="Days (wall clock) each day's count of items new to a profile is kept, for "
        "the recent popularity served to short histories; 0 = nothing is counted. Keep it above "
        "the longest window an artifact blends (its config's trending.days).",
    )
    event_max_future_s: float = Field(
        300.0, ge=0, description="Events whose ts lies further ahead than this are dead-lettered."
    )
    profile_half_life_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Half-life of interaction weights, in event time."
    )
    profile_recent_max: int = Field(50, ge=1, description="Recent items kept per profile.")
    profile_seen_retention_s: float = Field(
        30 * 24 * 3600.0,
        gt=0,
        description="Event ids are remembered this long (event time) for de-duplication; events "
        "older than the profile's newest ts minus this are ignored as too late.",
    )
    profile_seen_max: int = Field(
        5000,
        ge=0,
        description="Event ids remembered per user for de-duplication (the newest; 0 = no cap), "
        "on top of the retention window; trimmed at each fold.",
    )
    profile_items_max: int = Field(
        500, ge=0, description="Items kept per profile: the heaviest (0 = no cap)."
    )
    profile_categories_max: int = Field(
        64, ge=0, description="Categories kept per profile: the heaviest (0 = no cap)."
    )
    profile_idle_ttl_s: int = Field(
        90 * 24 * 3600,
        ge=0,
        description="Every key of a user expires this long after its last fold (wall-clock "
        "seconds; 0 = never), so idle profiles do not stay forever.",
    )
    profile_rebase_after_s: float = Field(
        0.0,
        ge=0,
        description="Rescale stored weights when the newest ts runs this far past the profile's "
        "base time; 0 = 32 half-lives.",
    )
    profile_shift_threshold: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Category-mix shift (total variation) that counts as a meaningful change.",
    )
    weight_view: float = Field(1.0, ge=0, description="Weight of a view.")
    weight_click: float = Field(2.0, ge=0, description="Weight of a click.")
    weight_dwell_max: float = Field(
        4.0, ge=0, description="Weight of a dwell at or above dwell_cap_ms (linear below)."
    )
    dwell_cap_ms: int = Field(120_000, ge=1, description="Dwell time that earns the full weight.")

    @property
    def rebase_after_s(self) -> float:
        return self.profile_rebase_after_s or 32 * self.profile_half_life_s
