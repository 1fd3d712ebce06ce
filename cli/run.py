"""`recstream run`: the whole pipeline in the foreground, one supervised child per service.

Services start in reverse data-flow order (read API, cache writer, embeddings publisher,
regeneration, Faust worker) so each one's consumer is there before its input flows, and stop in
data-flow order: the Faust worker stops folding first, then regeneration drains its in-flight work
and flushes, then the embeddings publisher, then the cache writer writes what is left, then the
API. The embeddings publisher (differentially private profile vectors for analytics) starts only
when its artifact is configured (``RECSTREAM_EMBEDDINGS_MODEL_DIR``). Children run in their own
process group, so Ctrl-C reaches only this supervisor, which sends each child SIGTERM in turn and
waits for it to close.

A child that dies on its own is restarted after an exponentially growing delay (Kafka consumer
groups and Redis state make a restart safe: each service resumes from its committed offsets).
A child that crashes ``max_crashes`` times within ``crash_window_s`` is failing for a reason a
restart will not fix: then everything is stopped and the command fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings

from cli.supervise import Child
from recstream.errors import RecstreamError
from recstream.settings import ENV_PREFIX, CommonSettings

__all__ = ["SERVICES", "Pipeline", "RunSettings"]

log = logging.getLogger(__name__)

# Data-flow order; started reversed, stopped in this order.
SERVICES = ("streams", "regen", "embeddings", "cache-writer", "api")

# Services started only when the children's environment sets this variable (their settings
# field): without it they have nothing to serve and would only crash-loop.
OPTIONAL = {"embeddings": f"{ENV_PREFIX}EMBEDDINGS_MODEL_DIR"}


class RunSettings(BaseSettings):
    """How `recstream run` supervises its children (``RECSTREAM_RUN_*``)."""

    model_config = CommonSettings.model_config  # same prefix; no addresses of its own

    run_stop_timeout_s: float = Field(
        60.0, gt=0, description="Per service, on shutdown: how long it may drain before SIGKILL."
    )
    run_max_crashes: int = Field(
        5, ge=1, description="A service that crashes this often within the window stops all."
    )
    run_crash_window_s: float = Field(
        300.0, gt=0, description="The window in which crashes of one service are counted."
    )
    run_backoff_s: float = Field(
        1.0, gt=0, description="Delay before the first restart; doubled for each further crash."
    )
    run_backoff_max_s: float = Field(30.0, gt=0, description="Longest delay before a restart.")
    run_static_membership: bool = Field(
        True,
        description="Give the children a group instance id (static membership) held by this run "
        "slot, so a restarted consumer takes its partitions back at once.",
    )
    run_slot_dir: Path = Field(
        Path.home() / ".cache" / "recstream" / "run",
        description="Where runs on this host lock their slots (one group instance id each).",
    )


GROUP_INSTANCE_VAR = f"{ENV_PREFIX}GROUP_INSTANCE_ID"


@contextlib.contextmanager
def instance_slot(directory: Path, slots: int = 64) -> Iterator[str]:
    """Hold the lowest free run slot on this host and yield its group instance id.

    Consecutive runs get the same id (slot 0), so a consumer group sees the new run's members as
    the old ones coming back, not as strangers waiting for the old members' sessions to expire;
    runs side by side hold different slots (an id shared by two live members would fence one).
    The lock is an flock: a killed run releases it with its process.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(slots):
        handle = (directory / f"slot-{slot}.lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        try:
            yield f"{socket.gethostname()}-run{slot}"
        finally:
            handle.close()
        return
    raise RecstreamError(f"all {slots} run slots under {directory} are held")


@dataclass
class _Service:
    name: str
    child: Child | None = None
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


class Pipeline:
    """Starts the services as ``python -m cli serve NAME`` children and keeps them running."""

    def __init__(
        self,
        exclude: set[str] | None = None,
        env: dict[str, str] | None = None,
        *,
        args: dict[str, list[str]] | None = None,
        settings: RunSettings | None = None,
    ) -> None:
        self.env = env
        children_env = os.environ if env is None else env
        unset = {name for name, var in OPTIONAL.items() if not children_env.get(var)}
        for name in sorted(unset - (exclude or set())):
            log.info("%s not started: %s is not set", name, OPTIONAL[name])
        self.names = [name for name in SERVICES if name not in (exclude or set()) | unset]
        self.args = args or {}  # extra command-line arguments per service (e.g. --loglevel)
        self.settings = settings or RunSettings()
        self.services = {name: _Service(name) for name in self.names}

    def command(self, name: str) -> list[str]:
        return [sys.executable, "-m", "cli", "serve", name, *self.args.get(name, [])]

    def _start(self, service: _Service) -> None:
        service.child = Child.spawn(service.name, self.command(service.name), env=self.env)
        service.restart_at = None
        log.info("started %s (pid %d)", service.name, service.child.pid)

    def start(self) -> None:
        for name in reversed(self.names):
            self._start(self.services[name])

    def stop(self) -> None:
        """SIGTERM each child in data-flow order and wait for it; kill one that hangs."""
        for name in self.names:
            child = self.services[name].child
            if child is None or child.returncode is not None:
                continue
            log.info("stopping %s", name)
            grace = self.settings.run_stop_timeout_s
            if child.stop(grace) == -signal.SIGKILL:
                log.error("%s did not stop in %.0fs; killed it", name, grace)

    def _check(self, service: _Service, now: float) -> None:
        """Notice a crash and schedule its restart; raise when the service keeps crashing."""
        child = service.child
        if service.restart_at is not None or child is None or child.returncode is None:
            return
        child.stop(0)  # reap, and kill anything it left in its group
        s = self.settings
        service.crashes.append(now)
        while service.crashes and service.crashes[0] < now - s.run_crash_window_s:
            service.crashes.popleft()
        count = len(service.crashes)
        if count >= s.run_max_crashes:
            raise RecstreamError(
                f"{service.name} crashed {count} times within {s.run_crash_window_s:.0f}s "
                f"(last exit status {child.returncode}); pipeline stopped"
            )
        delay = min(s.run_backoff_s * 2 ** (count - 1), s.run_backoff_max_s)
        log.error(
            "%s exited with status %s (crash %d within %.0fs); restarting in %.1fs",
            service.name,
            child.returncode,
            count,
            s.run_crash_window_s,
            delay,
        )
        service.restart_at = now + delay

    def run(self, stop: threading.Event) -> None:
        """Start everything, restart crashed children until ``stop``, then stop in order."""
        env = os.environ if self.env is None else self.env
        with contextlib.ExitStack() as held:
            if self.settings.run_static_membership and not env.get(GROUP_INSTANCE_VAR):
                instance = held.enter_context(instance_slot(self.settings.run_slot_dir))
                self.env = {**env, GROUP_INSTANCE_VAR: instance}
                log.info("consumer groups see this run as instance %s", instance)
            self._supervise(stop)

    def _supervise(self, stop: threading.Event) -> None:
        self.start()
        try:
            while not stop.wait(0.2):
                now = time.monotonic()
                for service in self.services.values():
                    self._check(service, now)
                    if service.restart_at is not None and now >= service.restart_at:
                        self._start(service)
        finally:
            self.stop()
        log.info("pipeline stopped at %s", time.strftime("%H:%M:%S"))
