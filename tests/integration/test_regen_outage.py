"""The regeneration service rides out a Redis restart: it keeps its partitions and its work.

It reads each changed profile from Redis; while Redis is down (or loading its AOF after a restart)
it holds the changes and retries, instead of crashing, which would cost a restart and a model load.
The Redis here is a private one (on its own port, with an AOF), so killing it disturbs nobody.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from cli.supervise import free_port
from consumers.regen import RegenService
from consumers.settings import RegenSettings
from inference.pool import WorkerPool
from lab.datasets import Dataset
from recstream.kafka import idempotent_producer
from schemas import ProfileChanged, ProfileChanges
from tests.conftest import Namespace
from tests.integration.redis_support import start_redis
from tests.integration.test_regen import _fold_one_by_one, _read_topic, _wait_for, dataset, pool  # noqa: F401 (fixtures)

pytestmark = pytest.mark.integration


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    port = free_port()
    process = start_redis(port, tmp_path)
    try:
        yield port, tmp_path
    finally:
        process.kill()
        process.wait(10)


def test_a_change_announced_while_redis_is_down_is_regenerated_once_it_is_back(
    ns: Namespace,
    pool: WorkerPool,  # noqa: F811
    dataset: Dataset,  # noqa: F811
    private_redis: tuple[int, Path],
) -> None:
    port, folder = private_redis
    settings = ns.settings.model_copy(
        update={"redis_url": SecretStr(f"redis://127.0.0.1:{port}/0")}
    )
    user = "outage-user"
    items = list(dataset.items)[:3]
    versions = _fold_one_by_one(settings, user, items, datetime(2026, 1, 1, tzinfo=UTC))
    version, ts = versions[-1]
    service = RegenService(
        RegenSettings(
            **settings.model_dump(),
            regen_group_id=ns.group("regen"),
            regen_debounce_ms=0.0,
            regen_redis_retry_s=60.0,
        ),
        pool,
    )
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        _wait_for(service.running.is_set, 30, "the regeneration service to subscribe")
        pid = int(redis.Redis(port=port).info("server")["process_id"])
        subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pid)], check=True)
        producer = idempotent_producer(settings)
        change = ProfileChanged(
            user_id=user,
            profile_version=version,
            changes=ProfileChanges(new_items=[items[-1]], events=1),
            event_id=f"e-{user}-2",
            trigger_ts=ts,
        )
        producer.produce(
            settings.topic_profiles_changed, key=user.encode(), value=change.model_dump_json()
        )
        assert producer.flush(10) == 0
        time.sleep(3)  # the change is consumed and its profile read fails, repeatedly
        assert thread.is_alive(), "the service died with Redis"
        assert _read_topic(settings, ns.group("before")) == []

        restarted = start_redis(port, folder)  # replays the AOF: the profile is back
        try:
            _wait_for(
                lambda: bool(_read_topic(settings, ns.group(f"r{time.monotonic_ns()}"))),
                30,
                "the held change's list on the output topic",
            )
            (published,) = _read_topic(settings, ns.group("after"))
            assert published.user_id == user
            assert published.profile_version == version
            assert published.source == "model"
        finally:
            service.stop()
            thread.join(30)
            restarted.kill()
            restarted.wait(10)
    finally:
        if thread.is_alive():
            service.stop()
            thread.join(30)
