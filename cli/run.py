"""`recstream run`: the whole pipeline in the foreground, one child process per service.

Services start in reverse data-flow order (read API, cache writer, regeneration, Faust worker) so
each one's consumer is there before its input flows, and stop in data-flow order: the Faust worker
stops folding first, then regeneration drains its in-flight work and flushes, then the cache
writer writes what is left, then the API. Children run in their own process group, so Ctrl-C
reaches only this supervisor, which sends each child SIGTERM in turn and waits for it to close.
If a child dies on its own, the others are stopped the same way and the command fails.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from recstream.errors import RecstreamError

__all__ = ["SERVICES", "Pipeline"]

log = logging.getLogger(__name__)

# Data-flow order; started reversed, stopped in this order.
SERVICES = ("streams", "regen", "cache-writer", "api")


@dataclass
class _Child:
    name: str
    process: subprocess.Popen[bytes]


class Pipeline:
    """Starts and supervises the services as ``recstream serve NAME`` child processes."""

    def __init__(
        self,
        exclude: set[str] | None = None,
        stop_timeout_s: float = 60.0,
        args: dict[str, list[str]] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.names = [name for name in SERVICES if name not in (exclude or set())]
        self.stop_timeout_s = stop_timeout_s
        self.args = args or {}
        self.env = env
        self.children: list[_Child] = []

    def start(self) -> None:
        for name in reversed(self.names):
            process = subprocess.Popen(
                [sys.executable, "-m", "cli", "serve", name, *self.args.get(name, [])],
                env=self.env,
                start_new_session=True,  # Ctrl-C goes to the supervisor, which stops in order
            )
            self.children.append(_Child(name, process))
            log.info("started %s (pid %d)", name, process.pid)

    def stop(self) -> None:
        """SIGTERM each child in data-flow order and wait for it; kill one that hangs."""
        by_name = {child.name: child for child in self.children}
        for name in self.names:
            child = by_name.get(name)
            if child is None or child.process.poll() is not None:
                continue
            log.info("stopping %s", name)
            child.process.send_signal(signal.SIGTERM)
            try:
                child.process.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop in %.0fs; killing it", name, self.stop_timeout_s)
                child.process.kill()
                child.process.wait()

    def run(self, stop: threading.Event) -> None:
        """Start everything, wait for ``stop`` (or a child dying), then stop in order."""
        self.start()
        failed: _Child | None = None
        try:
            while not stop.wait(0.5):
                failed = next((c for c in self.children if c.process.poll() is not None), None)
                if failed is not None:
                    break
        finally:
            self.stop()
        if failed is not None:
            raise RecstreamError(
                f"{failed.name} exited with status {failed.process.returncode}; pipeline stopped"
            )
        log.info("pipeline stopped at %s", time.strftime("%H:%M:%S"))
