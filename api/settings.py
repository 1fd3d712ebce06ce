"""Settings of the read API (``recstream serve api``).

Every field the API owns starts with ``api_`` and reads ``RECSTREAM_API_<SETTING>`` (e.g.
``RECSTREAM_API_PORT``, ``RECSTREAM_API_KEYS_FILE``), the rule of every service's settings
(recstream/settings.py); command-line flags, generated from these fields, override them.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr

from recstream.settings import CommonSettings, is_loopback

__all__ = ["ApiSettings", "is_loopback"]


class ApiSettings(CommonSettings):
    """The HTTP service web frontends read recommendations from."""

    principal: ClassVar[str] = "api"

    api_host: str = Field("127.0.0.1", description="Listen address.")
    api_port: int = Field(8000, ge=0, le=65535, description="Listen port.")
    api_keys_file: Path | None = Field(
        None,
        description="File of API key digests and scopes (`recstream api keys add`); when set, "
        "every /v1 request needs a key with the route's scope.",
    )
    api_allow_anonymous: bool = Field(
        False,
        description="Serve read routes without keys on a non-loopback address (without it, the "
        "API refuses to start there with no keys file).",
    )
    api_metrics_host: str = Field("127.0.0.1", description="Address of /metrics (Prometheus).")
    api_metrics_port: int = Field(
        9105, ge=0, le=65535, description="Port of /metrics, apart from the API's; 0 = off."
    )
    api_key: SecretStr | None = Field(
        None,
        description="Removed (the one plain key): the API refuses to start while it is set; "
        "use the keys file.",
    )
    api_default_k: int = Field(10, ge=1, le=200, description="Items returned when k is not given.")
    api_max_k: int = Field(100, ge=1, le=1000, description="Largest k a client may ask for.")
    api_variant: str = Field("default", description="Variant named on fallback lists.")
    api_events_max_batch: int = Field(
        500, ge=1, le=10_000, description="Most events one POST /v1/events may carry."
    )
    api_max_body_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest request body the API reads (POST /v1/events); larger is a 413.",
    )
    api_events_ack_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="How long POST /v1/events waits for Kafka to acknowledge its events before "
        "answering 503 (the producer also stops retrying them then).",
    )
    api_conversation_model_dir: Path | None = Field(
        None,
        description="Trained artifact folder (with its item index) that POST "
        "/v1/users/{user_id}/conversation refines lists with; unset = that route answers 503.",
    )
    api_conversation_ttl_s: int = Field(
        1800,
        ge=1,
        le=7 * 24 * 3600,
        description="How long a conversation session lives after its last turn (seconds).",
    )
    api_trending_refresh_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="How often a conversation turn's window of recent-popularity counts is read "
        "again (seconds); only turns of histories short enough for the blend read it.",
    )
    # Named like the stream worker's field, so one RECSTREAM_EVENT_MAX_FUTURE_S sets both and the
    # API never accepts an event that the fold would dead-letter for its ts.
    event_max_future_s: float = Field(
        300.0,
        ge=0,
        description="Events whose ts lies further ahead than this are refused (400), as the "
        "stream worker would dead-letter them.",
    )
