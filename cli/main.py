"""The `recstream` command line: one entry point, a subcommand per service and tool.

Heavy imports (torch, faust) happen inside the commands that need them, so `recstream --help` and
`recstream stack up` stay fast. Options also read ``RECSTREAM_*`` environment variables through the
settings classes; a flag given on the command line wins.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from cli.run import SERVICES, RunSettings
from recstream.errors import RecstreamError
from recstream.options import given, settings_options
from recstream.process import configure_logging, on_stop_signals


class _Group(click.Group):
    """Turns the project's own errors into a one-line message and exit status 1, no traceback.

    A setting out of its range (from a flag or an environment variable) is a usage error: the
    settings classes validate every value, so the message names the field and its rule.
    """

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except RecstreamError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)
        except ValidationError as exc:
            click.secho(f"error: invalid settings: {exc}", fg="red", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recstream")
def main() -> None:
    """recstream: an event-driven streaming recommender on Kafka, Faust, Redis and transformers."""


@main.group()
def stack() -> None:
    """Start, stop and inspect the local Kafka (KRaft) broker and Redis server."""


@stack.command("up")
@click.option(
    "--secure",
    is_flag=True,
    help="SASL/SCRAM and ACLs on Kafka, ACL users on Redis, one principal per service; "
    "passwords generated into the secrets dir (RECSTREAM_STACK_SECURE). A stack dir once "
    "started secure stays secure.",
)
def stack_up(secure: bool) -> None:
    """Provision Kafka from Maven Central, start Kafka and Redis, create topics, wait for both.

    A broker or Redis already answering on the configured address is reused. With --secure,
    give services RECSTREAM_SECRETS_DIR (printed) so each finds its own credentials.
    """
    from cli.stack import Stack, StackSettings

    Stack(StackSettings(stack_secure=True) if secure else None).up(say=click.echo)


@stack.command("down")
def stack_down() -> None:
    """Stop what `stack up` started (and nothing else)."""
    from cli.stack import Stack

    Stack().down(say=click.echo)


@stack.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def stack_status(as_json: bool) -> None:
    """Show whether Kafka and Redis answer, who started them, and where they log."""
    from cli.stack import Stack

    status = Stack().status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    for name, info in status.items():
        state = "ready" if info["ready"] else "down"
        owner = f"pid {info['pid']}" if info["started_by_stack"] else "not started by stack"
        secure = " secure" if info["secure"] else ""
        click.echo(f"{name:6} {state:5} {info['address']}{secure}  ({owner})  log: {info['log']}")


@main.command()
@click.option("--dataset", default="ml-100k", show_default=True, help="Dataset to replay.")
@click.option(
    "--artifact-dir",
    type=click.Path(path_type=Path),
    default=Path("artifacts/ml-100k"),
    show_default=True,
    help="Trained model to serve; trained there first when missing.",
)
@click.option("--rate", default=20.0, show_default=True, help="Replayed events per second.")
@click.option("--limit", type=int, help="Stop the replay after this many events.")
@click.option(
    "--train-minutes",
    default=5.0,
    show_default=True,
    help="The transformer's training minutes (its second training, which judges the "
    "recent-popularity blend, takes at most as long again).",
)
@click.option("--duration-s", type=float, help="Stop by itself after this many seconds.")
def demo(  # noqa: PLR0917 - one parameter per click option
    dataset: str,
    artifact_dir: Path,
    rate: float,
    limit: int | None,
    train_minutes: float,
    duration_s: float | None,
) -> None:
    """The live demo: stack, catalog, model, every service, a real replay, a live board.

    Ctrl-C stops the replay, then the services (which drain), then what the demo started.
    """
    from cli.demo import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            dataset=dataset,
            artifact_dir=artifact_dir,
            rate=rate,
            limit=limit,
            train_minutes=train_minutes,
            duration_s=duration_s,
        )
    )


@main.command("run")
@click.option(
    "--without",
    multiple=True,
    type=click.Choice(SERVICES),
    help="Leave a service out (repeatable).",
)
@settings_options(RunSettings, strip="run_")
def run_pipeline(without: tuple[str, ...], **flags: Any) -> None:
    """Run the whole pipeline in the foreground on the stack from `recstream stack up`.

    Starts the Faust worker (`serve streams`), the regeneration consumer with its pool, the cache
    writer and the read API as child processes, all configured by the same environment (each
    service reads its own RECSTREAM_<SERVICE>_* variables). A service that crashes is restarted
    with exponential backoff; one that keeps crashing stops the pipeline. Ctrl-C or SIGTERM stops
    them in data-flow order, each draining and closing.
    """
    from cli.run import Pipeline

    settings = RunSettings(**given(flags))
    configure_logging("info")
    # Every service reads its own RECSTREAM_<SERVICE>_* names, so one environment serves all
    # children. The Faust worker's /metrics is off by default when run alone (tests start many);
    # the pipeline exposes it beside the consumers' unless the environment says otherwise.
    env = {"RECSTREAM_STREAMS_METRICS_PORT": "9101", **os.environ}
    pipeline = Pipeline(exclude=set(without), env=env, settings=settings)
    stop = threading.Event()
    on_stop_signals(stop.set)
    pipeline.run(stop)


@main.group()
def serve() -> None:
    """Run one service in the foreground."""


def _register() -> None:
    """Attach the commands that each package defines next to its code."""
    from api.cli import register as register_api
    from consumers.cli import register as register_consumers
    from lab.cli import register as register_lab
    from ops.cli import register as register_ops
    from streams.cli import register as register_streams

    for register in (
        register_streams,
        register_consumers,
        register_api,
        register_lab,
        register_ops,
    ):
        register(main, serve)
    from cli.doctor import doctor

    main.add_command(doctor)


_register()
