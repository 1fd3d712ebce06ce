"""Commands of the inference package."""

from __future__ import annotations

import click


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's commands to the `recstream` command line."""
