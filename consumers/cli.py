"""Commands of the consumers package: the regeneration service and the cache writer.

Every option falls back to its ``RECSTREAM_*`` environment variable (through the settings classes);
a flag given on the command line wins. Heavy modules are imported inside the commands.
"""

from __future__ import annotations

import logging
import signal
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


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's commands to the `recstream` command line."""
    for command in (serve_regen, serve_cache_writer):
        serve.add_command(command)
