"""The live demo: the whole pipeline on real data, with recommendations changing on screen.

`recstream demo` starts the local stack, loads the catalog, trains the model (or reuses a trained
artifact), starts every service (`recstream run`), replays real interactions as clickstream events
at a gentle rate, and shows each user's recommendations as they are regenerated, read from the
`recommendations` topic with item titles from the catalog. Ctrl-C (or SIGTERM) stops the replay,
then the services (which drain and flush), then whatever part of the stack the demo started.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from confluent_kafka import Consumer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli.stack import Stack
from cli.supervise import Child, http_ok
from lab.datasets import resolve
from recstream.errors import RecstreamError
from recstream.keys import Keys
from recstream.security import kafka_config, redis_client
from recstream.settings import CommonSettings

RECSTREAM = [sys.executable, "-m", "cli"]


@dataclass
class DemoOptions:
    """What the demo runs on and how fast it replays."""

    dataset: str = "ml-100k"
    artifact_dir: Path = Path("artifacts/ml-100k")
    rate: float = 20.0
    limit: int | None = None
    api_url: str = "http://127.0.0.1:8000"
    api_metrics_url: str = "http://127.0.0.1:9105"  # the API's /metrics port (api_metrics_port)
    rows: int = 12
    duration_s: float | None = None
    train_minutes: float = 5.0
    namespace: str = "demo:"


@dataclass
class Board:
    """The latest recommendations per user, newest first, with counters for the header."""

    rows: int
    latest: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    received: int = 0
    fallbacks: int = 0
    started: float = field(default_factory=time.monotonic)

    def update(self, message: dict[str, Any]) -> None:
        user = str(message["user_id"])
        self.received += 1
        if message.get("source") == "fallback":
            self.fallbacks += 1
        self.latest.pop(user, None)
        self.latest[user] = message
        while len(self.latest) > self.rows:
            self.latest.popitem(last=False)


class _Stop:
    """SIGINT/SIGTERM only set a flag; the main loop then shuts everything down in order."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._set)
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def run_demo(options: DemoOptions, settings: CommonSettings | None = None) -> None:
    """Bring everything up, show the live board until stopped, then tear down in order."""
    base = settings or CommonSettings()
    # A missing dataset stops the demo here, naming the command that fetches it, before the stack
    # starts (`catalog load` would stop at the same error later).
    resolve(options.dataset, base.data_dir)
    settings = base.model_copy(update={"key_prefix": f"{base.key_prefix}{options.namespace}"})
    console = Console()
    stop = _Stop()
    stack = Stack()
    already_up = stack.kafka_ready() and stack.redis_ready()
    stack.up(say=lambda line: console.print(f"[dim]{line}[/dim]"))
    if stack.secure:  # every child, and the board, finds its principal's secret there
        settings = settings.model_copy(update={"secrets_dir": stack.secrets})
    children: list[Child] = []
    logs = stack.logs
    board_data = _Catalog(settings)
    # Replayed event ids are deterministic, so a second demo over the same keys would fold nothing:
    # every run starts from an empty namespace of its own.
    cleared = board_data.clear_namespace()
    console.print(
        f"[dim]redis: fresh namespace {settings.key_prefix!r} ({cleared} keys cleared)[/dim]"
    )
    env = {
        **os.environ,
        "RECSTREAM_KEY_PREFIX": settings.key_prefix,
        "RECSTREAM_REGEN_MODEL_DIR": str(options.artifact_dir.resolve()),
        **({"RECSTREAM_SECRETS_DIR": str(stack.secrets)} if stack.secure else {}),
    }
    _artifact_keys(stack.dir, env)
    try:
        _step(
            console,
            "loading the catalog",
            [*RECSTREAM, "catalog", "load", "--dataset", options.dataset],
            env,
        )
        if (options.artifact_dir / "manifest.json").exists():
            console.print(f"[dim]model: reusing {options.artifact_dir}[/dim]")
            if not (options.artifact_dir / "manifest.sig").exists():
                # Trained before artifacts were signed: its hashes are checked, then it is signed.
                sign = [*RECSTREAM, "artifact", "sign", str(options.artifact_dir)]
                _step(console, "signing the model", [*sign, "--adopt-unsigned"], env)
        else:
            _step(
                console,
                "training the model (first run only)",
                [
                    *RECSTREAM,
                    "train",
                    "--dataset",
                    options.dataset,
                    "--out",
                    str(options.artifact_dir),
                    "--max-minutes",
                    str(options.train_minutes),
                ],
                env,
            )
        children.append(
            Child.spawn("recstream run", [*RECSTREAM, "run"], logs / "demo-run.log", env)
        )
        children[0].wait_healthy(
            http_ok(f"{options.api_url}/healthz"),
            timeout_s=180.0,
            stopped=lambda: stop.requested,
            interval_s=0.5,
        )
        replay = [
            *RECSTREAM,
            "replay-dataset",
            "--dataset",
            options.dataset,
            "--rate",
            str(options.rate),
        ]
        if options.limit:
            replay += ["--limit", str(options.limit)]
        children.append(Child.spawn("replay", replay, logs / "demo-replay.log", env))
        console.print(
            f"services up: API {options.api_url}/v1/users/<id>/recommendations (open on "
            f"loopback: no keys file), its metrics {options.api_metrics_url}/metrics; logs in "
            f"{logs}. Ctrl-C stops everything."
        )
        board = Board(options.rows)
        deadline = time.monotonic() + options.duration_s if options.duration_s else None
        with (
            _recommendations(settings) as consumer,
            Live(console=console, refresh_per_second=4) as live,
        ):
            while not stop.requested and (deadline is None or time.monotonic() < deadline):
                msg = consumer.poll(0.25)
                value = msg.value() if msg is not None and msg.error() is None else None
                if value is not None:
                    message = orjson.loads(value)
                    message["latest"] = board_data.latest_item(str(message["user_id"]))
                    board.update(message)
                live.update(_render(board, board_data))
                if children[0].returncode is not None:
                    raise RecstreamError(
                        f"`recstream run` exited ({children[0].returncode}); see "
                        f"{logs / 'demo-run.log'}"
                    )
    finally:
        for child in reversed(children):
            child.stop(grace_s=30.0)
        if not already_up:
            stack.down(say=lambda line: console.print(f"[dim]{line}[/dim]"))


class _Catalog:
    """Item titles and each user's latest item, read from Redis for the board (titles cached)."""

    def __init__(self, settings: CommonSettings) -> None:
        self._redis = redis_client(settings, decode_responses=True)
        self._keys = Keys(settings.key_prefix)
        self._titles: dict[str, str] = {}

    def clear_namespace(self) -> int:
        keys = list(self._redis.scan_iter(match=f"{self._keys.prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            self._redis.delete(*keys[start : start + 1000])
        return len(keys)

    def title(self, item_id: str) -> str:
        if item_id not in self._titles:
            title = self._redis.hget(self._keys.item(item_id), "title")
            self._titles[item_id] = str(title) if title else f"item {item_id}"
        return self._titles[item_id]

    def latest_item(self, user_id: str) -> str | None:
        newest = self._redis.zrevrange(self._keys.profile_recent(user_id), 0, 0)
        return str(newest[0]) if newest else None


def _render(board: Board, catalog: _Catalog) -> Table:
    elapsed = time.monotonic() - board.started
    table = Table(
        title=(
            f"recommendations received: {board.received} "
            f"({board.received / max(elapsed, 1e-9):.1f}/s), fallbacks: {board.fallbacks}"
        ),
        expand=True,
    )
    columns = ("user", "version", "latest event", "top 5 now", "#1 because", "source", "model")
    for name in columns:
        table.add_column(name, overflow="fold")
    for user, message in reversed(board.latest.items()):
        items: list[dict[str, Any]] = message.get("items") or []
        top = "; ".join(catalog.title(str(it["item_id"])) for it in items[:5])
        latest = message.get("latest")
        model: dict[str, Any] = message.get("model") or {}
        table.add_row(
            user,
            str(message.get("profile_version")),
            catalog.title(latest) if latest else "",
            top,
            top_reasons(message),
            str(message.get("source")),
            f"{model.get('name')}@{model.get('version')}",
        )
    return table


def top_reasons(message: dict[str, Any]) -> str:
    """The titles of the history items behind the list's first item (its ``because``)."""
    items: list[dict[str, Any]] = message.get("items") or []
    because: list[dict[str, Any]] = items[0].get("because") or [] if items else []
    return "; ".join(str(r.get("title") or r.get("item_id")) for r in because)


@contextmanager
def _recommendations(settings: CommonSettings) -> Iterator[Consumer]:
    """A consumer of the recommendations topic from now on, in a throwaway group."""
    consumer = Consumer(
        {
            **kafka_config(settings),
            "group.id": f"recstream-demo-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "latest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([settings.topic_recommendations])
    try:
        yield consumer
    finally:
        consumer.close()


def _artifact_keys(stack_dir: Path, env: dict[str, str]) -> None:
    """Sign and verify the demo's model with a local key pair, made on the first run.

    Services refuse unsigned artifacts. An operator who set RECSTREAM_ARTIFACT_* keeps them.
    """
    from inference.integrity import generate_keypair

    if any(name.startswith("RECSTREAM_ARTIFACT_") for name in env):
        return
    folder = stack_dir / "artifact-keys"
    key, pub = folder / "artifact-signing.key", folder / "artifact-signing.pub"
    if not key.exists():
        generate_keypair(folder)
    env["RECSTREAM_ARTIFACT_SIGNING_KEY_FILE"] = str(key)
    env["RECSTREAM_ARTIFACT_VERIFY_KEY_FILE"] = str(pub)


def _step(console: Console, what: str, cmd: list[str], env: dict[str, str]) -> None:
    console.print(f"[bold]{what}[/bold]: {' '.join(cmd[3:])}")
    done = subprocess.run(cmd, check=False, env=env)
    if done.returncode != 0:
        raise RecstreamError(f"{what} failed (exit {done.returncode})")
