"""The `recstream` command line: one entry point, a subcommand per service and tool.

Heavy imports (torch, faust) happen inside the commands that need them, so `recstream --help` and
`recstream stack up` stay fast. Options also read ``RECSTREAM_*`` environment variables through the
settings classes; a flag given on the command line wins.
"""

from __future__ import annotations

import json
import sys

import click

from recstream.errors import RecstreamError


class _Group(click.Group):
    """Turns the project's own errors into a one-line message and exit status 1, no traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except RecstreamError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="recstream")
def main() -> None:
    """recstream: an event-driven streaming recommender on Kafka, Faust, Redis and transformers."""


@main.group()
def stack() -> None:
    """Start, stop and inspect the local Kafka (KRaft) broker and Redis server."""


@stack.command("up")
def stack_up() -> None:
    """Provision Kafka from Maven Central, start Kafka and Redis, create topics, wait for both.

    A broker or Redis already answering on the configured address is reused.
    """
    from recstream.stack import Stack

    Stack().up(say=click.echo)


@stack.command("down")
def stack_down() -> None:
    """Stop what `stack up` started (and nothing else)."""
    from recstream.stack import Stack

    Stack().down(say=click.echo)


@stack.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def stack_status(as_json: bool) -> None:
    """Show whether Kafka and Redis answer, who started them, and where they log."""
    from recstream.stack import Stack

    status = Stack().status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
        return
    for name, info in status.items():
        state = "ready" if info["ready"] else "down"
        owner = f"pid {info['pid']}" if info["started_by_stack"] else "not started by stack"
        click.echo(f"{name:6} {state:5} {info['address']}  ({owner})  log: {info['log']}")


@main.group()
def serve() -> None:
    """Run one service in the foreground."""


def _register() -> None:
    """Attach the commands that each package defines next to its code."""
    from consumers.cli import register as register_consumers
    from inference.cli import register as register_inference
    from ops.cli import register as register_ops
    from streams.cli import register as register_streams

    for register in (register_streams, register_inference, register_consumers, register_ops):
        register(main, serve)


_register()
