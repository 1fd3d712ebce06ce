"""The one way recstream starts, watches and stops a child process.

`recstream run`, the demo, the local stack and the integration tests all start services as child
processes. Each child runs in its own process group (so Ctrl-C reaches only the parent, which then
stops children in order) with its output in a log file; readiness is a bounded wait on a probe that
fails fast when the child exits; stopping is SIGTERM to the group, SIGKILL after a grace period,
and always a reap, so no zombie keeps a later liveness check waiting.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from recstream.errors import RecstreamError

__all__ = [
    "Child",
    "ChildFailedError",
    "free_port",
    "free_port_pair",
    "http_ok",
    "terminate_group",
]

Probe = Callable[[], bool]


class ChildFailedError(RecstreamError):
    """A child exited during start-up or did not become healthy in time."""


def http_ok(url: str, timeout_s: float = 1.0) -> Probe:
    """A probe that is true when ``url`` answers HTTP 200."""

    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    return probe


@dataclass
class Child:
    """One child process in its own process group, writing to ``log``."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path | None

    @classmethod
    def spawn(
        cls,
        name: str,
        cmd: Sequence[str],
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        *,
        append: bool = True,
    ) -> Child:
        """Start ``cmd``; without ``log`` the child shares the parent's output."""
        out = log.open("ab" if append else "wb") if log is not None else None
        try:
            process = subprocess.Popen(
                list(cmd),
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                stdin=subprocess.DEVNULL,
                env=None if env is None else dict(env),
                start_new_session=True,  # Ctrl-C reaches the parent, which stops children in order
            )
        finally:
            if out is not None:
                out.close()  # the child holds its own descriptor
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log_tail(self, chars: int = 3000) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    def wait_healthy(
        self,
        probe: Probe,
        timeout_s: float,
        *,
        stopped: Probe = lambda: False,
        interval_s: float = 0.2,
    ) -> bool:
        """Wait until ``probe()`` holds; False when ``stopped()`` became true first.

        Raises :class:`ChildFailedError` (with the end of the log) if the child exits or the probe
        does not hold within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while not stopped():
            if self.process.poll() is not None:
                raise ChildFailedError(
                    f"{self.name} exited during start-up ({self.process.returncode})"
                    + (f"; end of {self.log}:\n{self.log_tail()}" if self.log else "")
                )
            if probe():
                return True
            if time.monotonic() > deadline:
                raise ChildFailedError(
                    f"{self.name} not healthy after {timeout_s:.0f}s"
                    + (f"; end of {self.log}:\n{self.log_tail()}" if self.log else "")
                )
            time.sleep(interval_s)
        return False

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` to the child's process group (no-op once it has exited)."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)

    def stop(self, grace_s: float = 30.0, *, signalled: bool = False) -> int:
        """SIGTERM the group (unless ``signalled`` already), SIGKILL after ``grace_s``; reap.

        Returns the exit status; a child that needed SIGKILL returns ``-SIGKILL``.
        """
        if self.process.poll() is None:
            if not signalled:
                self.signal(signal.SIGTERM)
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        _kill_leftovers(self.process.pid)
        return self.process.returncode


def _kill_leftovers(pgid: int) -> None:
    """SIGKILL what is left of a group whose leader has exited (grandchildren it left behind)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def terminate_group(pid: int, grace_s: float) -> None:
    """Stop a process group by its leader's pid, when no :class:`Child` handle is at hand.

    The stack's processes outlive the `stack up` that started them, so `stack down` knows only
    their pid. When the leader is our own child (the demo starts and stops the stack in one
    process), it is reaped here; otherwise its exit would leave a zombie that still "exists".
    """
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _exists(pid):
            return
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    _exists(pid)


def _exists(pid: int) -> bool:
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass  # not our child: whoever started it reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a child to bind next)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_pair(taken: int = 0) -> int:
    """A free port whose successor is free too (a Kafka broker's controller listens on port + 1),
    neither of them ``taken``: both are bound once to check, so a port a client connection holds
    counts as taken (not only one something listens on)."""
    while True:
        port = free_port()
        if port >= 65535 or taken in (port, port + 1):
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
