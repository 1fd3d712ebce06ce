"""Commands of the api package: `recstream serve api` and `recstream api keys add|list|revoke`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from api.settings import ApiSettings
from recstream.errors import ConfigError
from recstream.options import given, settings_options
from recstream.process import configure_logging
from schemas.api import Scope

__all__ = ["register"]


@click.command("api")
@settings_options(ApiSettings, strip="api_")
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def serve_api(loglevel: str, **flags: Any) -> None:
    """Serve GET /v1/users/{user_id}/recommendations, POST /v1/events (clickstream ingestion,
    as the `producer` principal), the admin routes, /healthz and /openapi.json; /metrics on its
    own port.

    Routes need an API key with their scope (X-API-Key) listed in the keys file
    (RECSTREAM_API_KEYS_FILE, made by `recstream api keys add`). Without a keys file the API
    serves reads to anyone, and refuses to start on a non-loopback address unless
    --allow-anonymous is given.
    """
    from api.app import run

    configure_logging(loglevel)
    run(ApiSettings(**given(flags)))


@click.group("api")
def api_group() -> None:
    """Manage the read API."""


@api_group.group("keys")
def keys_group() -> None:
    """Create, list and revoke API keys (the file stores their SHA-256, never the key)."""


def _file(flags: dict[str, Any]) -> Path:
    path = ApiSettings(**given(flags)).api_keys_file
    if path is None:
        raise ConfigError("no keys file: pass --file or set RECSTREAM_API_KEYS_FILE")
    return path


_FILE = settings_options(ApiSettings, only=("api_keys_file",), flags={"api_keys_file": "--file"})


@keys_group.command("add")
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice([s.value for s in Scope]),
    help="A right of the key (repeatable).",
)
@click.option("--name", required=True, help="Who or what holds the key (1-64 characters).")
@click.option(
    "--expires",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S"]),
    help="When the key stops working (UTC).",
)
@_FILE
def keys_add(scopes: tuple[str, ...], name: str, expires: datetime | None, **flags: Any) -> None:
    """Make a key, store its digest in the keys file and print the key (once: it is kept nowhere).

    The key alone goes to standard output; what was stored goes to standard error.
    """
    from api.keys import add_key, new_key

    path = _file(flags)
    key, record = new_key(
        [Scope(s) for s in scopes],
        name,
        expires_at=expires.replace(tzinfo=UTC) if expires is not None else None,
    )
    add_key(path, record)
    click.echo(key)
    click.echo(
        f"added key {record.key_id} ({record.name}; {', '.join(record.scopes)}) to {path}; "
        "the key above is not stored anywhere",
        err=True,
    )


@keys_group.command("list")
@_FILE
def keys_list(**flags: Any) -> None:
    """Show each key's id, name, scopes and expiry (never a key or its digest)."""
    from api.keys import read_keys_file

    now = datetime.now(UTC)
    for record in read_keys_file(_file(flags)):
        expiry = "never" if record.expires_at is None else record.expires_at.isoformat()
        state = " (expired)" if record.expired(now) else ""
        click.echo(
            f"{record.key_id}  {record.name}  {','.join(record.scopes)}  expires {expiry}{state}"
        )


@keys_group.command("revoke")
@click.argument("key_id")
@_FILE
def keys_revoke(key_id: str, **flags: Any) -> None:
    """Remove a key from the file; a running API refuses it within about a second."""
    from api.keys import revoke_key

    path = _file(flags)
    record = revoke_key(path, key_id)
    click.echo(f"revoked key {record.key_id} ({record.name}) from {path}")


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's commands to the `recstream` command line."""
    serve.add_command(serve_api)
    main.add_command(api_group)
