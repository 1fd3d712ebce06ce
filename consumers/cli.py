"""Commands of the consumers package: the regeneration service, the cache writer, the read API and
``recstream run``, which starts the whole pipeline.

Every option falls back to its ``RECSTREAM_*`` environment variable (through the settings classes);
a flag given on the command line wins. Heavy modules are imported inside the commands.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import click

__all__ = ["register"]


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in flags.items() if v is not None}


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def _on_stop_signals(stop: Any) -> None:
    """SIGTERM and SIGINT only set the stop flag; the service then drains and closes."""

    def handler(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@click.command("regen")
@click.option("--group-id", "regen_group_id", help="Consumer group. [env RECSTREAM_REGEN_GROUP_ID]")
@click.option(
    "--debounce-ms", type=float, help="Coalescing window per user. [env RECSTREAM_DEBOUNCE_MS; 20]"
)
@click.option("--k", "recs_k", type=int, help="Items per list. [env RECSTREAM_RECS_K; 10]")
@click.option("--variant", help="A/B variant name. [env RECSTREAM_VARIANT; default]")
@click.option("--dataset", help="Catalog and fallback dataset. [env RECSTREAM_DATASET; ml-100k]")
@click.option(
    "--model-dir",
    type=click.Path(path_type=Path, exists=True, file_okay=False),
    help="Trained artifact (recstream train); default: co-occurrence CF. [env RECSTREAM_MODEL_DIR]",
)
@click.option(
    "--workers", type=int, help="Pool processes; default 1 per GPU, else 1. [env RECSTREAM_WORKERS]"
)
@click.option("--max-batch-size", type=int, help="[env RECSTREAM_MAX_BATCH_SIZE; 32]")
@click.option("--max-wait-ms", type=float, help="[env RECSTREAM_MAX_WAIT_MS; 2]")
@click.option("--queue-size", type=int, help="Pool queue bound. [env RECSTREAM_QUEUE_SIZE; 256]")
@click.option(
    "--request-timeout-s", type=float, help="Fallback after. [env RECSTREAM_REQUEST_TIMEOUT_S; 2]"
)
@click.option(
    "--metrics-port", type=int, help="/metrics and /healthz. [env RECSTREAM_METRICS_PORT; 9102]"
)
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def serve_regen(loglevel: str, **flags: Any) -> None:
    """Regenerate recommendations on every profile change (profiles.changed → recommendations).

    Starts the worker pool (warmed up before consuming), then consumes until SIGTERM/Ctrl-C, after
    which it drains in-flight work, flushes the producer, commits and closes.
    """
    from consumers.metrics import serving_metrics
    from consumers.regen import RegenService, build_pool
    from consumers.settings import RegenSettings

    _logging(loglevel)
    settings = RegenSettings(**_given(flags))
    pool = build_pool(settings).start()
    try:
        service = RegenService(settings, pool)
        _on_stop_signals(service.stop)
        with serving_metrics(settings.metrics_host, settings.metrics_port, service.health):
            service.run()
    finally:
        pool.close()


@click.command("cache-writer")
@click.option("--group-id", "cache_group_id", help="Consumer group. [env RECSTREAM_CACHE_GROUP_ID]")
@click.option("--ttl-s", "recs_ttl_s", type=int, help="List expiry. [env RECSTREAM_RECS_TTL_S]")
@click.option(
    "--batch-size", "cache_batch_size", type=int, help="[env RECSTREAM_CACHE_BATCH_SIZE; 500]"
)
@click.option(
    "--metrics-port", type=int, help="/metrics and /healthz. [env RECSTREAM_METRICS_PORT; 9103]"
)
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def serve_cache_writer(loglevel: str, **flags: Any) -> None:
    """Write the recommendations topic into Redis recs:{user}, never going backwards."""
    from consumers.cache_writer import CacheWriter
    from consumers.metrics import serving_metrics
    from consumers.settings import CacheWriterSettings

    _logging(loglevel)
    settings = CacheWriterSettings(**_given(flags))
    writer = CacheWriter(settings)
    _on_stop_signals(writer.stop)
    with serving_metrics(settings.metrics_host, settings.metrics_port, writer.health):
        writer.run()


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

    _logging(loglevel)
    run(ApiSettings(**_given(flags)))


@click.command("run")
@click.option(
    "--without",
    multiple=True,
    type=click.Choice(["streams", "regen", "cache-writer", "api"]),
    help="Leave a service out (repeatable).",
)
@click.option("--stop-timeout-s", default=60.0, show_default=True, help="Per service, on shutdown.")
@click.option(
    "--streams-metrics-port", default=9101, show_default=True, help="Faust worker /metrics port."
)
@click.option(
    "--regen-metrics-port", default=9102, show_default=True, help="Regeneration /metrics port."
)
@click.option(
    "--cache-writer-metrics-port", default=9103, show_default=True, help="Cache writer /metrics."
)
def run_pipeline(
    without: tuple[str, ...],
    stop_timeout_s: float,
    streams_metrics_port: int,
    regen_metrics_port: int,
    cache_writer_metrics_port: int,
) -> None:
    """Run the whole pipeline in the foreground on the stack from `recstream stack up`.

    Starts the Faust worker (`serve streams`), the regeneration consumer with its pool, the cache
    writer and the read API as child processes, all configured by the same RECSTREAM_*
    environment. Ctrl-C or SIGTERM stops them in data-flow order, each draining and closing.
    """
    from recstream.run import Pipeline

    _logging("info")
    # One environment for every child, so the metrics ports are given as flags.
    ports = {
        "streams": ["--metrics-port", str(streams_metrics_port)],
        "regen": ["--metrics-port", str(regen_metrics_port)],
        "cache-writer": ["--metrics-port", str(cache_writer_metrics_port)],
    }
    pipeline = Pipeline(exclude=set(without), stop_timeout_s=stop_timeout_s, args=ports)
    stop = threading.Event()
    _on_stop_signals(stop.set)
    pipeline.run(stop)


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's commands to the `recstream` command line."""
    for command in (serve_regen, serve_cache_writer, serve_api):
        serve.add_command(command)
    main.add_command(run_pipeline)
