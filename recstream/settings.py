"""Settings shared by every service.

Each service has one frozen settings object deriving from :class:`CommonSettings`; these classes
are the only code that reads the environment. Every variable carries the ``RECSTREAM_`` prefix.
The fields here are shared by every service and read ``RECSTREAM_<SETTING>`` (e.g.
``RECSTREAM_KAFKA_BOOTSTRAP``); a field a service owns starts with the service's name
(``RECSTREAM_STREAMS_METRICS_PORT``, ``RECSTREAM_REGEN_K``, ``RECSTREAM_API_PORT``), so the
children of `recstream run`, which share one environment, never read each other's settings.
Sub-models add ``__``: ``RECSTREAM_REGEN_POOL__WORKERS``. Secrets are
:class:`pydantic.SecretStr` so they never print.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "RECSTREAM_"
DAY_MS = 24 * 3600 * 1000
REPO_ROOT = Path(__file__).resolve().parents[1]
CHECKOUT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"


def default_data_dir(checkout_data: Path = CHECKOUT_DATA_DIR) -> Path:
    """Where named datasets live unless ``RECSTREAM_DATA_DIR`` says otherwise.

    ``../shared/data`` beside a checkout wins when it exists (the development machines and CI keep
    MovieLens there); anyone else gets a per-user cache folder, ``$XDG_CACHE_HOME/recstream/
    datasets`` (``~/.cache/recstream/datasets``), which ``recstream data fetch`` fills.
    """
    if checkout_data.is_dir():
        return checkout_data
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "recstream" / "datasets"


class CommonSettings(BaseSettings):
    """Addresses, topic names and key prefixes that all services agree on."""

    principal: ClassVar[str] = "admin"
    """Whose credentials this settings class's clients use (``recstream.security``); each
    service's class names its own, operator tools run as ``admin``."""

    model_config: ClassVar[SettingsConfigDict] = SettingsConfigDict(
        # Sub-models read RECSTREAM_<FIELD>__<SUBFIELD> (e.g. RECSTREAM_REGEN_POOL__WORKERS).
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers.")
    redis_url: SecretStr = Field(
        SecretStr("redis://127.0.0.1:6379/0"),
        description="Redis URL; may carry a password, so it is kept secret.",
    )
    # Credentials (recstream.security). Without any, clients connect as today: plaintext Kafka,
    # Redis's default user (the development stack). A deployment gives each service its own.
    secrets_dir: Path | None = Field(
        None,
        description="Folder of per-principal secrets, kafka/<principal> and redis/<principal> "
        "(what `stack up --secure` writes); each service reads its own principal's files.",
    )
    kafka_username: str | None = Field(
        None, description="Kafka SASL/SCRAM user; overrides the secrets dir's principal."
    )
    kafka_password: SecretStr | None = Field(None, description="Password of kafka_username.")
    kafka_password_file: Path | None = Field(
        None, description="File holding the password of kafka_username."
    )
    redis_username: str | None = Field(
        None, description="Redis ACL user; overrides the secrets dir's principal."
    )
    redis_password: SecretStr | None = Field(None, description="Password of redis_username.")
    redis_password_file: Path | None = Field(
        None, description="File holding the password of redis_username."
    )
    key_prefix: str = Field("", description="Prefix of every Redis key recstream writes.")
    topic_clickstream: str = Field("clickstream", description="Topic of raw clickstream events.")
    topic_dlq: str = Field("clickstream.dlq", description="Topic of dead-lettered events.")
    topic_profiles_changed: str = Field(
        "profiles.changed", description="Topic of meaningful profile changes."
    )
    topic_recommendations: str = Field(
        "recommendations", description="Topic of regenerated recommendation lists."
    )
    topic_profiles_changed_dlq: str = Field(
        "profiles.changed.dlq",
        description="Dead letters of profiles.changed (records the regeneration service refused).",
    )
    topic_recommendations_dlq: str = Field(
        "recommendations.dlq",
        description="Dead letters of recommendations (records the cache writer refused).",
    )
    topic_profile_embeddings: str = Field(
        "profiles.embeddings",
        description="Topic of differentially private profile embeddings (what analytics reads).",
    )
    topic_users_erased: str = Field(
        "users.erased",
        description="Compacted topic of erased users (GDPR art. 17): what every fold and "
        "rebuild honours.",
    )
    group_instance_id: str = Field(
        "",
        description="Static Kafka group membership: a stable id per process slot (a pod name; "
        "`recstream run` sets one per run slot) lets a restarted consumer take its partitions "
        "back at once instead of after the group's session timeout; empty: dynamic membership.",
    )
    topic_partitions: int = Field(4, ge=1, description="Partitions of the topics `stack up` makes.")
    topic_clickstream_retention_ms: int = Field(
        7 * DAY_MS,
        ge=-1,
        description="Retention of the clickstream (raw events) that `stack up` sets: the longest "
        "a raw event outlives its user's erasure (docs/privacy.md); -1 keeps them forever.",
    )
    topic_dlq_retention_ms: int = Field(
        3 * DAY_MS,
        ge=1,
        description="Retention of the dead-letter topics that `stack up` sets (they hold the "
        "raw bytes of refused records).",
    )
    topic_outputs_retention_ms: int = Field(
        7 * DAY_MS,
        ge=1,
        description="Retention of profiles.changed, recommendations and profiles.embeddings that "
        "`stack up` sets (keyed by user id, not compacted).",
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where named datasets are found (`recstream data fetch` puts them there).",
    )

    def topics(self) -> list[str]:
        """Every topic the pipeline uses, in data-flow order."""
        return [
            self.topic_clickstream,
            self.topic_dlq,
            self.topic_profiles_changed,
            self.topic_profiles_changed_dlq,
            self.topic_recommendations,
            self.topic_recommendations_dlq,
            self.topic_profile_embeddings,
            self.topic_users_erased,
        ]

    def topic_configs(self) -> dict[str, dict[str, str]]:
        """Each topic's retention settings (Kafka topic configs), as `stack up` applies them.

        ``users.erased`` is compacted and kept: it is the record every rebuild honours.
        """
        dlqs = (self.topic_dlq, self.topic_profiles_changed_dlq, self.topic_recommendations_dlq)
        outputs = (
            self.topic_profiles_changed,
            self.topic_recommendations,
            self.topic_profile_embeddings,
        )
        configs = {self.topic_clickstream: _retention(self.topic_clickstream_retention_ms)}
        configs.update({t: _retention(self.topic_dlq_retention_ms) for t in dlqs})
        configs.update({t: _retention(self.topic_outputs_retention_ms) for t in outputs})
        configs[self.topic_users_erased] = {"cleanup.policy": "compact", "retention.ms": "-1"}
        return configs


def _retention(ms: int) -> dict[str, str]:
    return {"cleanup.policy": "delete", "retention.ms": str(ms)}


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced, for logs and status output: the one in the
    authority (``redis://user:pw@host``, ``rediss://``) and a ``password=`` query parameter."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "***"
    netloc = parts.netloc
    if "@" in netloc:
        creds, _, host = netloc.rpartition("@")
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if user else f"***@{host}"
    query = "&".join(
        f"{pair.partition('=')[0]}=***"
        if unquote(pair.partition("=")[0]).lower() in _SECRET_PARAMS
        else pair
        for pair in parts.query.split("&")
    )
    head = f"{parts.scheme}://{netloc}" if "://" in url else urlunsplit((*parts[:2], "", "", ""))
    return (
        head
        + parts.path
        + (f"?{query}" if parts.query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


_SECRET_PARAMS = frozenset({"password", "passwd", "pass", "pwd"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``0.0.0.0``, ``""`` and
    names other than ``localhost`` do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
