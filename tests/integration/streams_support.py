"""Helpers for stream-processor integration tests: a worker subprocess, Kafka I/O, waiting."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import Consumer

from cli.supervise import Child
from lab.datasets import Dataset, Item
from ops.catalog import load_catalog
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.security import kafka_config, redis_client
from recstream.settings import CommonSettings
from schemas import Profile
from streams.profile import read_profile
from streams.trending import day_of
from tests.conftest import settings_env

CATALOG = {
    "a": ("Action",),
    "b": ("Action", "Drama"),
    "c": ("Comedy",),
    "d": ("Drama", "Romance"),
    "e": (),
}


def load_test_catalog(settings: CommonSettings) -> dict[str, tuple[str, ...]]:
    items = {i: Item(i, f"Title {i}", cats, 2000) for i, cats in CATALOG.items()}
    client = redis_client(settings)
    try:
        load_catalog(client, Keys(settings.key_prefix), Dataset("test", [], items, {}))
    finally:
        client.close()
    return dict(CATALOG)


def event(
    eid: str, user: str, item: str, ts: float, kind: str = "view", *, dwell_ms: int = 0
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 1,
        "event_id": eid,
        "type": kind,
        "user_id": user,
        "item_id": item,
        "ts": datetime.fromtimestamp(ts, UTC).isoformat(),
    }
    if kind == "dwell":
        body["dwell_ms"] = dwell_ms
    return body


def produce(
    settings: CommonSettings,
    records: Iterable[tuple[bytes | None, bytes]],
    topic: str | None = None,
) -> int:
    """Deliver ``records`` (key, value) to ``topic`` (default: the clickstream)."""
    producer = idempotent_producer(settings)
    count = 0
    for key, value in records:
        producer.produce(topic or settings.topic_clickstream, key=key, value=value)
        count += 1
    assert producer.flush(30) == 0, "records not delivered"
    return count


def produce_events(settings: CommonSettings, events: Iterable[dict[str, Any]]) -> int:
    return produce(settings, ((e["user_id"].encode(), orjson.dumps(e)) for e in events))


@dataclass
class Consumed:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]
    partition: int
    offset: int


def consume(
    topic: str,
    settings: CommonSettings,
    until: Callable[[list[Consumed]], bool],
    timeout_s: float = 45.0,
) -> list[Consumed]:
    """Read ``topic`` from the start until ``until(records)`` holds; fail after the timeout."""
    consumer = Consumer(
        {
            **kafka_config(settings),
            "group.id": f"reader-{topic}-{time.monotonic_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[Consumed] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(out):
            assert time.monotonic() < deadline, f"{topic}: condition not met, have {len(out)}"
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            headers: dict[str, bytes] = {}
            for pair in msg.headers() or []:
                raw = pair[1]
                headers[pair[0]] = raw.encode() if isinstance(raw, str) else raw or b""
            out.append(
                Consumed(
                    msg.key(), msg.value() or b"", headers, msg.partition() or 0, msg.offset() or 0
                )
            )
    finally:
        consumer.close()
    return out


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 45.0) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def profiles(settings: CommonSettings, users: Iterable[str]) -> dict[str, Profile | None]:
    client = redis_client(settings)
    try:
        keys = Keys(settings.key_prefix)
        return {u: read_profile(client, keys, u) for u in users}
    finally:
        client.close()


def counts(settings: CommonSettings, users: Iterable[str]) -> dict[str, int]:
    return {u: (p.event_count if p else 0) for u, p in profiles(settings, users).items()}


def trend_counts(settings: CommonSettings, ts: float) -> dict[str, int]:
    """The recent-popularity counts of the day of event time ``ts`` (``streams.trending``)."""
    client = redis_client(settings)
    try:
        raw = client.hgetall(Keys(settings.key_prefix).trending(day_of(ts)))
    finally:
        client.close()
    return {item.decode(): int(n) for item, n in raw.items()}


def users_per_item(events: Iterable[dict[str, Any]]) -> dict[str, int]:
    """How many users touched each item: the counts each item should have, at most."""
    pairs = {(e["user_id"], e["item_id"]) for e in events}
    out: dict[str, int] = {}
    for _, item in pairs:
        out[item] = out.get(item, 0) + 1
    return out


@dataclass
class Worker:
    """``recstream serve streams`` in a subprocess, configured through RECSTREAM_* variables."""

    settings: CommonSettings
    app_id: str
    workdir: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    child: Child | None = None
    proc: subprocess.Popen[bytes] | None = None  # child.process, for tests that wait on it
    log_path: Path | None = None

    def env(self) -> dict[str, str]:
        env = settings_env(self.settings)
        env.update(
            {
                "RECSTREAM_STREAMS_APP_ID": self.app_id,
                "RECSTREAM_STREAMS_DATADIR": str(self.workdir),
                "RECSTREAM_STREAMS_BATCH_WITHIN_S": "0.05",
                # A worker that dies without leaving its group hands partitions on this soon.
                "RECSTREAM_STREAMS_SESSION_TIMEOUT_S": "6",
                **self.extra_env,
            }
        )
        return env

    def start(self) -> Worker:
        self.log_path = self.workdir / f"worker-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "cli", "serve", "streams", "--loglevel", "warning"]
        self.child = Child.spawn("streams worker", cmd, self.log_path, self.env(), append=False)
        self.proc = self.child.process
        return self

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait; a worker that does not exit in time is killed and reported."""
        assert self.child is not None
        if self.child.returncode is not None:
            return self.child.stop(0)  # exited already (a test may have killed it): reap only
        code = self.child.stop(timeout_s)
        if code == -signal.SIGKILL:
            raise AssertionError("worker ignored SIGTERM")
        return code
