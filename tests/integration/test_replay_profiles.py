"""`recstream replay profiles` against the real Kafka and Redis: rebuild, resume, switch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from ops.exceptions import ReplayError
from ops.rebuild import ProfileRebuild, RebuildStats
from ops.settings import OpsSettings
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.security import async_redis_client, kafka_config, redis_client
from recstream.settings import CommonSettings
from schemas import Profile
from streams.fold import FoldParams, FoldScript
from tests.conftest import Namespace
from tests.integration.streams_support import (
    Worker,
    counts,
    event,
    load_test_catalog,
    produce,
    profiles,
    wait_for,
)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
USERS = ["u1", "u2", "u3", "u:4"]


def history(per_user: int = 25, start: int = 0) -> list[dict[str, Any]]:
    """Interleaved views, clicks and dwells over the test catalog's items, in time order."""
    kinds = ("view", "click", "dwell")
    out = []
    for n in range(start, start + per_user):
        for u, user in enumerate(USERS):
            out.append(
                event(
                    f"{user}-{n}",
                    user,
                    "abcde"[(n * 3 + u) % 5],
                    T0 + 90 * n + u,
                    kinds[(n + u) % 3],
                    dwell_ms=(n % 7) * 15_000,
                )
            )
    return out


def records(events: list[dict[str, Any]]) -> list[tuple[bytes | None, bytes]]:
    return [(e["user_id"].encode(), orjson.dumps(e)) for e in events]


def ops_settings(ns: Namespace, **extra: Any) -> OpsSettings:
    return OpsSettings(**ns.settings.model_dump(), **extra)


def in_namespace(settings: CommonSettings, name: str) -> CommonSettings:
    return settings.model_copy(
        update={"key_prefix": Keys(settings.key_prefix).namespace(name).prefix}
    )


def assert_same_profile(live: Profile | None, rebuilt: Profile | None) -> None:
    """Equal content; the version counts fold batches, so it may differ between the two."""
    assert live is not None and rebuilt is not None
    assert rebuilt.event_count == live.event_count
    assert rebuilt.last_event_ts == live.last_event_ts
    assert rebuilt.recent_items == live.recent_items
    assert rebuilt.item_weights == pytest.approx(live.item_weights, rel=1e-12)
    assert rebuilt.category_affinities == pytest.approx(live.category_affinities, rel=1e-12)


def keys_under(settings: CommonSettings, prefix: str) -> list[bytes]:
    client = redis_client(settings)
    try:
        return list(client.scan_iter(match=f"{prefix}*", count=1000))
    finally:
        client.close()


@pytest.fixture
def live_worker(ns: Namespace, tmp_path: Path) -> Iterator[Worker]:
    worker = Worker(ns.settings, ns.group("streams"), tmp_path)
    yield worker
    if worker.proc is not None:
        worker.stop()


def test_rebuild_equals_live_then_switch_is_atomic_and_folds_the_tail(
    ns: Namespace, live_worker: Worker
) -> None:
    load_test_catalog(ns.settings)
    events = history()
    bad = [(b"u1", b"{not json"), (b"u2", orjson.dumps({**events[1], "type": "swipe"}))]
    duplicates = records(events[:6])
    produce(ns.settings, [*records(events), *bad, *duplicates])
    expected = {u: sum(1 for e in events if e["user_id"] == u) for u in USERS}

    # The live path: the Faust worker folds the topic into the live profiles.
    live_worker.start()
    wait_for(lambda: counts(ns.settings, USERS) == expected, "live profiles", timeout_s=60)
    live_worker.stop()
    live = profiles(ns.settings, USERS)

    # A user the rebuild will not know (its events are not on the topic).
    async def fold_ghost() -> None:
        client = async_redis_client(ns.settings)
        try:
            await FoldScript(client, ns.settings.key_prefix, FoldParams()).run(
                {"ghost": [("ghost-0", "a", T0, 1.0)]}
            )
        finally:
            await client.aclose()

    asyncio.run(fold_ghost())

    settings = ops_settings(ns, replay_batch_size=37)
    with ProfileRebuild(settings, "t1", progress=False) as rebuild:
        plan = rebuild.plan(from_beginning=True)
        assert plan.phase == "new"
        assert plan.total == len(events) + len(bad) + len(duplicates)
        stats = rebuild.run(plan)
        assert stats.records == plan.total
        assert stats.folded == len(events)
        assert stats.duplicates == len(duplicates)
        assert sum(stats.invalid.values()) == len(bad)
        rebuilt = profiles(in_namespace(ns.settings, "t1"), USERS)
        for user in USERS:
            assert_same_profile(live[user], rebuilt[user])
        # The live profiles were not touched by the rebuild.
        assert profiles(ns.settings, USERS) == live

        # Events arriving after the rebuild's end offsets: the switch must fold them in.
        tail = [event(f"u1-tail-{n}", "u1", "c", T0 + 10_000 + n) for n in range(3)]
        produce(ns.settings, records(tail))
        result = rebuild.switch(rebuild.plan())

    assert (result.switched, result.removed) == (len(USERS), 1)
    assert result.tail.records == len(tail)
    assert result.tail.folded == len(tail)
    after = profiles(ns.settings, [*USERS, "ghost"])
    assert after["ghost"] is None
    for user in USERS[1:]:
        assert_same_profile(live[user], after[user])
    u1_live, u1_after = live["u1"], after["u1"]
    assert u1_live is not None and u1_after is not None
    assert u1_after.event_count == u1_live.event_count + len(tail)
    assert u1_after.recent_items[0] == "c"
    for user in USERS:
        before, now = live[user], after[user]
        assert before is not None and now is not None
        assert now.version > before.version, "a switch must never move a version back"
    namespace_prefix = Keys(ns.settings.key_prefix).namespace("t1").prefix
    assert keys_under(ns.settings, namespace_prefix) == []


def test_interrupted_rebuild_resumes_from_its_checkpoint(ns: Namespace) -> None:
    load_test_catalog(ns.settings)
    events = history(per_user=30)
    produce(ns.settings, records(events))
    settings = ops_settings(ns, replay_batch_size=10)

    with ProfileRebuild(settings, "full", progress=False) as full:
        full.run(full.plan(from_beginning=True))

    def stop_after_three(stats: RebuildStats) -> None:
        if stats.records >= 30:
            raise KeyboardInterrupt

    with ProfileRebuild(settings, "part", progress=False) as part:
        plan = part.plan(from_beginning=True)
        with pytest.raises(KeyboardInterrupt):
            part.run(plan, after_batch=stop_after_three)

    with ProfileRebuild(settings, "part", progress=False) as part:
        resumed = part.plan()
        assert resumed.phase == "folding"
        assert resumed.ranges == plan.ranges
        done = plan.total - resumed.left
        assert 30 <= done < plan.total
        with pytest.raises(ReplayError, match="holds a rebuild from beginning"):
            part.plan(since=datetime.now(UTC))
        second = part.run(resumed)
        assert second.records == resumed.left
        assert part.plan().phase == "folded"

    complete = profiles(in_namespace(ns.settings, "full"), USERS)
    resumed_profiles = profiles(in_namespace(ns.settings, "part"), USERS)
    for user in USERS:
        assert_same_profile(complete[user], resumed_profiles[user])


def test_from_time_starts_at_the_first_record_at_or_after_it(ns: Namespace) -> None:
    load_test_catalog(ns.settings)
    events = history(per_user=10)
    old, new = events[:16], events[16:]
    cut = datetime.now(UTC) - timedelta(minutes=30)
    producer = idempotent_producer(ns.settings)
    for batch, when in ((old, cut - timedelta(minutes=5)), (new, cut + timedelta(minutes=5))):
        for key, value in records(batch):
            producer.produce(
                ns.settings.topic_clickstream,
                key=key,
                value=value,
                timestamp=int(when.timestamp() * 1000),
            )
    assert producer.flush(30) == 0

    settings = ops_settings(ns)
    with ProfileRebuild(settings, "recent", progress=False) as rebuild:
        plan = rebuild.plan(since=cut)
        assert plan.total == len(new)
        stats = rebuild.run(plan)
    assert stats.folded == len(new)
    rebuilt = profiles(in_namespace(ns.settings, "recent"), USERS)
    expected = {u: sum(1 for e in new if e["user_id"] == u) for u in USERS}
    assert {u: p.event_count if p else 0 for u, p in rebuilt.items()} == expected


def test_dry_run_writes_nothing_and_drop_removes_a_rebuild(ns: Namespace) -> None:
    from click.testing import CliRunner

    from cli.main import main

    produce(ns.settings, records(history(per_user=3)))
    env = {
        "RECSTREAM_KAFKA_BOOTSTRAP": ns.settings.kafka_bootstrap,
        "RECSTREAM_REDIS_URL": ns.settings.redis_url.get_secret_value(),
        "RECSTREAM_KEY_PREFIX": ns.settings.key_prefix,
        "RECSTREAM_TOPIC_CLICKSTREAM": ns.settings.topic_clickstream,
    }
    result = CliRunner().invoke(
        main,
        ["replay", "profiles", "--from-beginning", "--namespace", "dry", "--dry-run", "--switch"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    total = next(line for line in result.output.splitlines() if line.strip().startswith("total"))
    assert total.split()[1:] == [str(3 * len(USERS))] * 2
    assert "nothing was written" in result.output
    assert keys_under(ns.settings, ns.settings.key_prefix) == []

    # The same rebuild for real, then abandoned with --drop.
    base = ["replay", "profiles", "--namespace", "dry", "--no-progress"]
    built = CliRunner().invoke(main, [*base, "--from-beginning"], env=env)
    assert built.exit_code == 0, built.output
    assert f"{3 * len(USERS)} events folded for {len(USERS)} users" in built.output
    counted = profiles(in_namespace(ns.settings, "dry"), USERS)
    assert all(p is not None and p.event_count == 3 for p in counted.values())
    dropped = CliRunner().invoke(main, [*base, "--drop"], env=env)
    assert dropped.exit_code == 0, dropped.output
    assert keys_under(ns.settings, Keys(ns.settings.key_prefix).namespace("dry").prefix) == []


def fold_directly(settings: CommonSettings, user: str, ts: float) -> None:
    """A live profile made without the topic (so no rebuild can see its events)."""

    async def fold() -> None:
        client = async_redis_client(settings)
        try:
            await FoldScript(client, settings.key_prefix, FoldParams()).run(
                {user: [(f"{user}-direct", "a", ts, 1.0)]}
            )
        finally:
            await client.aclose()

    asyncio.run(fold())


def produce_at(
    settings: CommonSettings,
    events: list[dict[str, Any]],
    when: datetime,
    partition: int | None = None,
) -> None:
    producer = idempotent_producer(settings)
    extra = {} if partition is None else {"partition": partition}
    for key, value in records(events):
        producer.produce(
            settings.topic_clickstream,
            key=key,
            value=value,
            timestamp=int(when.timestamp() * 1000),
            **extra,
        )
    assert producer.flush(30) == 0


def timed(user: str, n: int, when: datetime) -> dict[str, Any]:
    return event(f"{user}-{when.timestamp():.0f}-{n}", user, "abcde"[n % 5], when.timestamp() + n)


def test_switch_keeps_users_whose_history_fell_out_of_the_topic(ns: Namespace) -> None:
    """Retention (here ``delete_records``) removed the head of the topic: users whose events were
    all there are absent from a rebuild, and the switch must keep them, not delete them."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    from ops.topics import TopicReader

    load_test_catalog(ns.settings)
    now = datetime.now(UTC).replace(microsecond=0)
    old_t, new_t = now - timedelta(hours=3), now - timedelta(hours=1)
    idle = ["idle", "idle:2", "idle%3"]  # users with old events only
    old = [timed(u, n, old_t) for n in range(4) for u in [*idle, "both"]]
    new = [timed(u, n, new_t) for n in range(3) for u in ["both", "fresh"]]
    produce_at(ns.settings, old, old_t)
    settings = ops_settings(ns)
    with TopicReader(ns.settings, ns.settings.topic_clickstream) as reader:
        cut = {p: high for p, (_, high) in reader.watermarks().items()}
    produce_at(ns.settings, new, new_t)
    # A partition whose whole history is gone tells nothing about when its users were last
    # seen (the horizon is then "now"): give each partition a newer record so the horizon is
    # the time of the new records.
    fillers = [f"filler{p}" for p in range(ns.settings.topic_partitions)]
    for p, user in enumerate(fillers):
        produce_at(ns.settings, [timed(user, 0, new_t)], new_t, partition=p)

    # The live profiles: the whole history, folded and switched in while it was all on the topic.
    with ProfileRebuild(settings, "seed", progress=False) as seed:
        seed.run(seed.plan(from_beginning=True))
        assert seed.switch(seed.plan()).removed == 0
    # Two live users the topic never held: one newer than anything the next rebuild will read
    # (it could have seen such a user, so it is removed), one older (it could not: kept).
    fold_directly(ns.settings, "ghost", (now - timedelta(minutes=30)).timestamp())
    fold_directly(ns.settings, "ancient", (now - timedelta(days=2)).timestamp())
    everyone = [*idle, "both", "fresh", "ghost", "ancient"]
    before = profiles(ns.settings, everyone)
    assert all(p is not None for p in before.values())

    # Retention: the old records are gone from every partition that held some.
    cut = {p: offset for p, offset in cut.items() if offset > 0}
    admin = AdminClient(kafka_config(ns.settings))
    doomed = [TopicPartition(ns.settings.topic_clickstream, p, o) for p, o in cut.items()]
    for future in admin.delete_records(doomed, operation_timeout=30).values():
        future.result(30)

    with ProfileRebuild(settings, "after", progress=False) as rebuild:
        plan = rebuild.plan(from_beginning=True)
        assert {r.partition: r.start for r in plan.ranges if r.start > 0} == cut
        assert plan.total == len(new) + len(fillers)
        rebuild.run(plan)
        horizon = rebuild.horizon(rebuild.plan())
        assert horizon is not None
        assert new_t.timestamp() <= horizon < (now - timedelta(minutes=30)).timestamp()
        result = rebuild.switch(rebuild.plan())

    assert (result.switched, result.removed, result.kept) == (2 + len(fillers), 1, len(idle) + 1)
    after = profiles(ns.settings, everyone)
    assert after["ghost"] is None
    for user in [*idle, "ancient"]:
        assert after[user] == before[user], f"{user} must be kept as it was"
    fresh_before, fresh_after = before["fresh"], after["fresh"]
    assert fresh_before is not None and fresh_after is not None
    assert_same_profile(fresh_before, fresh_after)
    both = after["both"]
    assert both is not None and both.event_count == 3  # rebuilt from what the topic still has


def test_switch_after_a_rebuild_from_time_keeps_users_seen_only_before_it(ns: Namespace) -> None:
    """`replay profiles --from-time T --switch`: users whose events all precede T stay live."""
    from click.testing import CliRunner

    from cli.main import main

    load_test_catalog(ns.settings)
    now = datetime.now(UTC).replace(microsecond=0)
    old_t, new_t = now - timedelta(hours=3), now - timedelta(hours=1)
    # One partition: another one with only old records would have nothing after --from-time,
    # which tells the switch nothing about its users' last events (it would keep the ghost too).
    produce_at(ns.settings, [timed("before", n, old_t) for n in range(3)], old_t, partition=0)
    produce_at(ns.settings, [timed("after", n, new_t) for n in range(3)], new_t, partition=0)
    settings = ops_settings(ns)
    with ProfileRebuild(settings, "seed", progress=False) as seed:
        seed.run(seed.plan(from_beginning=True))
        seed.switch(seed.plan())
    fold_directly(ns.settings, "ghost", now.timestamp())
    before = profiles(ns.settings, ["before", "after", "ghost"])

    env = {
        "RECSTREAM_KAFKA_BOOTSTRAP": ns.settings.kafka_bootstrap,
        "RECSTREAM_REDIS_URL": ns.settings.redis_url.get_secret_value(),
        "RECSTREAM_KEY_PREFIX": ns.settings.key_prefix,
        "RECSTREAM_TOPIC_CLICKSTREAM": ns.settings.topic_clickstream,
    }
    since = (now - timedelta(hours=2)).isoformat()
    args = ["replay", "profiles", "--from-time", since, "--switch", "--no-progress"]
    result = CliRunner().invoke(main, [*args, "--namespace", "recent"], env=env)
    assert result.exit_code == 0, result.output
    assert "removed 1 and kept 1" in result.output
    after = profiles(ns.settings, ["before", "after", "ghost"])
    assert after["before"] == before["before"]
    assert after["ghost"] is None
    assert after["after"] is not None and after["after"].event_count == 3
