"""Commands of the consumers package: regeneration, the cache writer, the embeddings publisher.

Every option is generated from a settings field (recstream.options) and falls back to its
environment variable; a flag given on the command line wins. Heavy modules are imported inside the
commands.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from consumers.settings import CacheWriterSettings, EmbeddingsSettings, RegenSettings
from recstream.options import given, settings_options
from recstream.process import configure_logging, on_stop_signals

__all__ = ["register"]


@contextmanager
def _exit_nonzero_on_failure() -> Iterator[None]:
    """A service that gives up (retry budget spent, pool broken) exits 1 with one log line.

    Its offsets were stored only for finished work, so the supervisor's restart redoes the rest.
    """
    from consumers.exceptions import ConsumerError
    from inference.pool import PoolClosedError

    try:
        yield
    except (ConsumerError, PoolClosedError) as exc:
        logging.getLogger(__name__).critical("stopping: %s", exc)
        raise SystemExit(1) from exc


@click.command("regen")
@settings_options(RegenSettings, strip="regen_")
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def serve_regen(loglevel: str, **flags: Any) -> None:
    """Regenerate recommendations on every profile change (profiles.changed → recommendations).

    Starts the worker pool (warmed up before consuming), then consumes until SIGTERM/Ctrl-C, after
    which it drains in-flight work, flushes the producer, commits and closes.
    """
    from consumers.metrics import serving_metrics
    from consumers.regen import RegenService, build_pool

    configure_logging(loglevel)
    settings = RegenSettings(**given(flags))
    pool = build_pool(settings).start()
    try:
        service = RegenService(settings, pool)
        on_stop_signals(service.stop)
        with (
            _exit_nonzero_on_failure(),
            serving_metrics(
                settings.regen_metrics_host, settings.regen_metrics_port, service.health
            ),
        ):
            service.run()
    finally:
        pool.close()


@click.command("cache-writer")
@settings_options(CacheWriterSettings, strip="cache_")
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def serve_cache_writer(loglevel: str, **flags: Any) -> None:
    """Write the recommendations topic into Redis recs:{user}, never going backwards."""
    from consumers.cache_writer import CacheWriter
    from consumers.metrics import serving_metrics

    configure_logging(loglevel)
    settings = CacheWriterSettings(**given(flags))
    writer = CacheWriter(settings)
    on_stop_signals(writer.stop)
    with (
        _exit_nonzero_on_failure(),
        serving_metrics(settings.cache_metrics_host, settings.cache_metrics_port, writer.health),
    ):
        writer.run()


@click.command("embeddings")
@settings_options(EmbeddingsSettings, strip="embeddings_")
@click.option("--loglevel", default="info", show_default=True, help="Log level.")
def serve_embeddings(loglevel: str, **flags: Any) -> None:
    """Publish differentially private profile embeddings (profiles.changed → profiles.embeddings).

    Each release is the profile's item-embedding mean, clipped and noised (analytic Gaussian
    mechanism, ε/δ per release), and only while the user's privacy budget lasts.
    """
    from consumers.embeddings import EmbeddingsService, ItemVectors
    from consumers.metrics import serving_metrics
    from inference.exceptions import ArtifactError

    configure_logging(loglevel)
    settings = EmbeddingsSettings(**given(flags))
    if settings.embeddings_model_dir is None:
        raise ArtifactError(
            "the embeddings publisher embeds profiles with an artifact's item index: set the "
            "model directory (a folder written by `recstream train`)"
        )
    service = EmbeddingsService(settings, ItemVectors.from_artifact(settings.embeddings_model_dir))
    on_stop_signals(service.stop)
    with (
        _exit_nonzero_on_failure(),
        serving_metrics(
            settings.embeddings_metrics_host, settings.embeddings_metrics_port, service.health
        ),
    ):
        service.run()


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's commands to the `recstream` command line."""
    for command in (serve_regen, serve_cache_writer, serve_embeddings):
        serve.add_command(command)
