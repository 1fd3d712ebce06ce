"""Commands of the streams package: the Faust worker and profile inspection.

The worker's options are generated from :class:`streams.settings.StreamsSettings`
(recstream.options); each falls back to its environment variable, a flag wins.
"""

from __future__ import annotations

from typing import Any

import click

from recstream.options import given, settings_options
from streams.settings import StreamsSettings


def _settings(**overrides: Any) -> Any:
    """StreamsSettings from the environment, with the flags that were given on top."""
    return StreamsSettings(**given(overrides))


@click.command("streams")
@settings_options(
    StreamsSettings, strip="streams_", flags={"streams_batch_within_s": "--batch-within"}
)
def serve_streams(**flags: Any) -> None:
    """Run the Faust worker that folds `clickstream` into Redis profiles.

    The Redis URL comes only from RECSTREAM_REDIS_URL (it may carry a password). Stops cleanly
    on SIGTERM.
    """
    from faust import Worker

    from streams.app import build_app

    settings = _settings(**flags)
    if settings.streams_event_loop == "uvloop":
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app, _ = build_app(settings)
    Worker(app, loglevel=settings.streams_loglevel).execute_from_commandline()


@click.group("profile")
def profile() -> None:
    """User profiles kept by the stream processor."""


@profile.command("show")
@click.argument("user")
@click.option("--json", "as_json", is_flag=True, help="Print the profile as JSON.")
@click.option("--top", default=10, show_default=True, help="Items and categories to list.")
def profile_show(user: str, as_json: bool, top: int) -> None:
    """Print USER's profile as stored in Redis (weights decayed to its newest event)."""
    from recstream.keys import Keys
    from recstream.security import redis_client
    from streams.exceptions import StreamsError
    from streams.profile import read_profile

    settings = _settings()
    client = redis_client(settings)
    try:
        found = read_profile(client, Keys(settings.key_prefix), user)
    finally:
        client.close()
    if found is None:
        raise StreamsError(f"no profile for user {user!r}")
    if as_json:
        click.echo(found.model_dump_json(indent=2))
        return
    click.echo(
        f"user {found.user_id}  version {found.version}  events {found.event_count}  "
        f"last event {found.last_event_ts.isoformat()}"
    )
    click.echo("recent: " + ", ".join(found.recent_items[:top]))
    click.echo("items:")
    for item, weight in sorted(found.item_weights.items(), key=lambda kv: -kv[1])[:top]:
        click.echo(f"  {item:>12}  {weight:10.4f}")
    click.echo("categories:")
    for cat, weight in sorted(found.category_affinities.items(), key=lambda kv: -kv[1])[:top]:
        click.echo(f"  {cat:>12}  {weight:10.4f}")


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's commands to the `recstream` command line."""
    serve.add_command(serve_streams)
    main.add_command(profile)
