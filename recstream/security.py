"""Who a client connects as: every Kafka and Redis client recstream makes is configured here.

Each service runs as its own principal (:data:`PRINCIPALS`; its settings class names it in
``principal``), allowed only its own topics, groups, keys and commands (``ops.access`` holds
the rights). A principal's password is found, in this order:

1. ``RECSTREAM_KAFKA_USERNAME`` with ``RECSTREAM_KAFKA_PASSWORD`` or ``..._PASSWORD_FILE``
   (the same for ``REDIS``): a deployment that gives each container its own environment;
2. ``RECSTREAM_SECRETS_DIR``: files ``kafka/<principal>`` and ``redis/<principal>`` holding the
   password (what `recstream stack up --secure` writes), so the children of `recstream run`,
   which share one environment, each find their own;
3. neither: no credentials, as the plain development stack expects.

Kafka clients then authenticate with SASL/SCRAM-SHA-512 (no TLS: see docs/security.md), Redis
clients as the ACL user. Passwords stay :class:`pydantic.SecretStr` until the client library
takes them; nothing here logs or formats one.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import SecretStr

from recstream.errors import ConfigError
from recstream.settings import CommonSettings

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = [
    "KAFKA_MECHANISM",
    "PRINCIPALS",
    "Credentials",
    "async_redis_client",
    "credentials",
    "ensure_secrets",
    "kafka_config",
    "redis_client",
]

PRINCIPALS: Final = (
    "admin",
    "streams",
    "regen",
    "cache",
    "embeddings",
    "producer",
    "api",
    "converse",
    "eraser",
)
"""Every principal: one per service, the clickstream producers, the read API's conversation
(``converse``: the API's second Redis identity, for refinement turns), the eraser and the
operators."""

KAFKA_MECHANISM: Final = "SCRAM-SHA-512"

System = Literal["kafka", "redis"]


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and its password (which never prints)."""

    username: str
    password: SecretStr


def credentials(
    settings: CommonSettings, system: System, principal: str | None = None
) -> Credentials | None:
    """The credentials ``settings`` give for ``system``, as ``principal`` (default: the settings
    class's own); ``None`` when none are configured."""
    principal = principal or settings.principal
    username: str | None = getattr(settings, f"{system}_username")
    if username is not None:
        password: SecretStr | None = getattr(settings, f"{system}_password")
        path: Path | None = getattr(settings, f"{system}_password_file")
        if password is None and path is not None:
            password = _read_secret(path, f"{system} password file")
        if password is None:
            raise ConfigError(
                f"RECSTREAM_{system.upper()}_USERNAME is set without "
                f"RECSTREAM_{system.upper()}_PASSWORD or RECSTREAM_{system.upper()}_PASSWORD_FILE"
            )
        return Credentials(username, password)
    if settings.secrets_dir is not None:
        path = settings.secrets_dir / system / principal
        if not path.is_file():
            raise ConfigError(f"no {system} secret for principal {principal!r} in {path.parent}")
        return Credentials(principal, _read_secret(path, f"{system} secret of {principal!r}"))
    return None


def kafka_config(settings: CommonSettings, principal: str | None = None) -> dict[str, Any]:
    """librdkafka's connection settings (bootstrap servers, SASL) for any client; callers add
    their own keys to the dict."""
    config: dict[str, Any] = {"bootstrap.servers": settings.kafka_bootstrap}
    found = credentials(settings, "kafka", principal)
    if found is not None:
        config.update(
            {
                "security.protocol": "SASL_PLAINTEXT",
                "sasl.mechanism": KAFKA_MECHANISM,
                "sasl.username": found.username,
                "sasl.password": found.password.get_secret_value(),
            }
        )
    return config


def redis_client(
    settings: CommonSettings, principal: str | None = None, **options: Any
) -> redis.Redis:
    """A Redis client for ``settings.redis_url`` as ``principal``; ``options`` go to redis-py."""
    import redis

    username, password = _redis_auth(settings, principal)
    return redis.Redis.from_url(
        settings.redis_url.get_secret_value(), username=username, password=password, **options
    )


def async_redis_client(
    settings: CommonSettings, principal: str | None = None, **options: Any
) -> redis.asyncio.Redis:
    """The asyncio twin of :func:`redis_client`."""
    import redis.asyncio

    username, password = _redis_auth(settings, principal)
    return redis.asyncio.Redis.from_url(
        settings.redis_url.get_secret_value(), username=username, password=password, **options
    )


def ensure_secrets(folder: Path, principals: tuple[str, ...] = PRINCIPALS) -> None:
    """Give every principal a random Kafka and Redis password under ``folder`` (mode 0600 files
    in 0700 folders; an existing ``folder`` keeps its mode), keeping the ones already there; and
    the compose deployment's Grafana an admin password (``grafana/admin``)."""
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
    for system, names in (("kafka", principals), ("redis", principals), ("grafana", ("admin",))):
        sub = folder / system
        sub.mkdir(exist_ok=True)
        os.chmod(sub, 0o700)
        for principal in names:
            path = sub / principal
            if path.exists():
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))


def _redis_auth(settings: CommonSettings, principal: str | None) -> tuple[str | None, str | None]:
    """User and password for redis-py; ``None`` leaves whatever the URL says (or no auth)."""
    found = credentials(settings, "redis", principal)
    if found is None:
        return None, None
    return found.username, found.password.get_secret_value()


def _read_secret(path: Path, what: str) -> SecretStr:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from None
    if not text:
        raise ConfigError(f"the {what} {path} is empty")
    return SecretStr(text)
