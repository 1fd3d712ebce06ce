"""Command of the api package: ``recstream serve api``."""

from __future__ import annotations

from typing import Any

import click

from api.settings import ApiSettings
from recstream.options import given, settings_options
from recstream.process import configure_logging

__all__ = ["register"]


@click.command("api")
@settings_options(ApiSettings, strip="api_")
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def serve_api(loglevel: str, **flags: Any) -> None:
    """Serve GET /v1/users/{user_id}/recommendations, /healthz, /metrics, /openapi.json.

    The API key comes only from the environment (RECSTREAM_API_KEY), so it never shows in a
    process list; when set, /v1 requests must send it as X-API-Key.
    """
    from api.app import run

    configure_logging(loglevel)
    run(ApiSettings(**given(flags)))


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's command to the `recstream` command line."""
    serve.add_command(serve_api)
