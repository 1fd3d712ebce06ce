"""A throwaway redis-server for tests that kill Redis (the shared stack's is never touched)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis


def start_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    """A redis-server on ``port`` whose data survives a SIGKILL (append-only file, fsync always),
    started and answering."""
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                if client.ping():
                    return server
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                server.kill()
                raise TimeoutError("the throwaway redis-server did not answer in 10 s")
            time.sleep(0.05)
    finally:
        client.close()
