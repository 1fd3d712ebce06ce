"""Command of the api package: ``recstream serve api``."""

from __future__ import annotations

import logging
from typing import Any

import click

__all__ = ["register"]


@click.command("api")
@click.option("--host", "api_host", help="Listen address. [env RECSTREAM_API_HOST; 127.0.0.1]")
@click.option("--port", "api_port", type=int, help="Listen port. [env RECSTREAM_API_PORT; 8000]")
@click.option("--dataset", help="Fallback popularity dataset. [env RECSTREAM_DATASET; ml-100k]")
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def serve_api(loglevel: str, **flags: Any) -> None:
    """Serve GET /v1/users/{user_id}/recommendations, /healthz, /metrics, /openapi.json.

    The API key comes only from the environment (RECSTREAM_API_KEY), so it never shows in a
    process list; when set, /v1 requests must send it as X-API-Key.
    """
    from api.app import run
    from api.settings import ApiSettings

    logging.basicConfig(
        level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(ApiSettings(**{k: v for k, v in flags.items() if v is not None}))


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's command to the `recstream` command line."""
    serve.add_command(serve_api)
