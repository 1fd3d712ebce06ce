"""A lean Faust monitor: stamps arrival time and skips per-record bookkeeping.

Faust's default :class:`faust.sensors.Monitor` updates several counters and deques for every
record on its way in and out of a stream. The worker's own Prometheus metrics
(``streams/metrics.py``) already cover what we watch, so this monitor keeps only
``message.time_in`` (arrival, for the per-event fold latency) and leaves the rest to the base
class for everything that is not per record.
"""

from __future__ import annotations

from time import monotonic
from typing import Any

from faust.sensors import Monitor

__all__ = ["LeanMonitor"]


class LeanMonitor(Monitor):
    """Monitor without per-record bookkeeping (see module docstring)."""

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        message.time_in = monotonic()

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> None:
        return None

    def on_stream_event_out(
        self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None
    ) -> None:
        return None

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        return None
