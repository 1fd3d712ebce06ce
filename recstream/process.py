"""What every service process does the same way at start: log format and stop signals.

SIGTERM and SIGINT only ask the service to stop; the service then stops consuming, drains what is
in flight, flushes and closes, in data-flow order (STYLE.md, "Shutdown is orderly").
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

__all__ = ["configure_logging", "on_stop_signals"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """One log line format for every service, at ``level`` (a name such as ``info``)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def on_stop_signals(stop: Callable[[], object]) -> None:
    """Call ``stop`` (which must only set a flag) on SIGTERM or SIGINT."""

    def handler(signum: int, _frame: object) -> None:
        logging.getLogger(__name__).info("signal %d: stopping", signum)
        stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
