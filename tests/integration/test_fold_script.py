"""The Lua fold in real Redis agrees with the pure-Python reference, rescaling included."""

from __future__ import annotations

import asyncio
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis.asyncio

from recstream.keys import Keys
from recstream.security import async_redis_client, redis_client
from schemas import ClickEvent, DwellEvent, Envelope, Profile, ViewEvent
from schemas.deadletter import HEADER_DETAIL, HEADER_REASON
from streams import ProfileFolder, StoreUnavailable, StreamsSettings
from streams.fold import Folded, FoldParams, FoldScript, Weights, group_by_user, reference_fold
from streams.profile import read_profile_async
from tests.conftest import Namespace
from tests.integration.streams_support import load_test_catalog

pytestmark = pytest.mark.integration

AnyEvent = ClickEvent | ViewEvent | DwellEvent


def random_events(rng: random.Random, user: str, n: int, span_s: float) -> list[AnyEvent]:
    out: list[AnyEvent] = []
    for k in range(n):
        ts = datetime.fromtimestamp(1_600_000_000 + rng.uniform(0, span_s), UTC)
        eid, item = f"{user}-{k}", rng.choice("abcdef")
        kind = rng.choice(["view", "click", "dwell"])
        if kind == "view":
            out.append(ViewEvent(type="view", event_id=eid, user_id=user, item_id=item, ts=ts))
        elif kind == "click":
            out.append(ClickEvent(type="click", event_id=eid, user_id=user, item_id=item, ts=ts))
        else:
            dwell_ms = rng.randrange(0, 200_000)
            out.append(
                DwellEvent(
                    type="dwell", event_id=eid, user_id=user, item_id=item, ts=ts, dwell_ms=dwell_ms
                )
            )
    return out


async def fold_batches(
    ns: Namespace, params: FoldParams, batches: list[list[AnyEvent]]
) -> tuple[list[list[Folded]], list[Profile | None]]:
    """Fold ``batches`` with the script; return each batch's outcome and the stored profiles."""
    client = async_redis_client(ns.settings)
    weights = Weights()
    script = FoldScript(client, ns.settings.key_prefix, params)
    results: list[list[Folded]] = []
    try:
        for batch in batches:
            rows = [
                (e.user_id, e.event_id, e.item_id, e.ts.timestamp(), weights.of(e)) for e in batch
            ]
            results.append(list(await script.run(group_by_user(rows))))
        keys = Keys(ns.settings.key_prefix)
        users = sorted({e.user_id for b in batches for e in b})
        profiles = [await read_profile_async(client, keys, u) for u in users]
    finally:
        await client.aclose()
    return results, profiles


@pytest.mark.parametrize("half_life_s", [3600.0, 60.0])
def test_script_matches_reference_with_duplicates_shuffles_and_rescaling(
    ns: Namespace, half_life_s: float
) -> None:
    catalog = load_test_catalog(ns.settings)
    rng = random.Random(7)
    params = FoldParams(
        half_life_s=half_life_s,
        recent_max=4,
        retention_s=10 * 86400.0,
        rebase_after_s=4 * half_life_s,
        shift_threshold=0.05,
    )
    users = ["u1", "u2", "u3"]
    events = [e for u in users for e in random_events(rng, u, 60, span_s=6 * 3600)]
    rng.shuffle(events)
    batches = [events[i : i + 25] for i in range(0, len(events), 25)]
    batches.append(rng.sample(events, 30))  # replayed events: all duplicates
    outcomes, stored = asyncio.run(fold_batches(ns, params, batches))
    for profile in stored:
        assert profile is not None
        mine = [[e for e in b if e.user_id == profile.user_id] for b in batches]
        ref = reference_fold(mine, catalog, Weights(), params)
        assert profile.event_count == ref.event_count == 60
        assert profile.version == ref.version
        assert profile.last_event_ts.timestamp() == ref.reference_ts
        assert profile.item_weights == pytest.approx(ref.item_weights, rel=1e-9, abs=1e-300)
        assert profile.category_affinities == pytest.approx(
            ref.category_affinities, rel=1e-9, abs=1e-300
        )
        assert profile.recent_items == ref.recent_items(params.recent_max)
    last = outcomes[-1]
    assert all(r.folded == 0 and r.duplicates > 0 and not r.emit for r in last)


def test_large_batches_and_profiles_fold_in_slices(ns: Namespace) -> None:
    # 1,500 distinct items in one batch, then a jump far past the base time: every long
    # argument list (HMGET, HSET, ZADD, rescaling) exceeds one slice.
    params = FoldParams(half_life_s=10.0, recent_max=2000, retention_s=1e9, rebase_after_s=50.0)
    ts = datetime.fromtimestamp(1_600_000_000, UTC)
    later = datetime.fromtimestamp(1_600_000_100, UTC)
    batch: list[AnyEvent] = [
        ViewEvent(type="view", event_id=f"e{k}", user_id="big", item_id=f"i{k}", ts=ts)
        for k in range(1500)
    ]
    jump: list[AnyEvent] = [
        ClickEvent(type="click", event_id="last", user_id="big", item_id="i0", ts=later)
    ]
    outcomes, stored = asyncio.run(fold_batches(ns, params, [batch, jump]))
    (profile,) = stored
    assert profile is not None
    assert len(outcomes[0][0].new_items) == 1500
    assert profile.event_count == 1501
    assert profile.item_weights["i1"] == pytest.approx(2.0**-10, rel=1e-12)
    assert profile.item_weights["i0"] == pytest.approx(2.0 + 2.0**-10, rel=1e-12)
    assert profile.recent_items[0] == "i0"
    assert len(profile.recent_items) == 1500


# -- bounded state, refused users, Redis errors ----------------------------------------------


def rows_of(events: list[AnyEvent]) -> list[tuple[str, str, str, float, float]]:
    weights = Weights()
    return [(e.user_id, e.event_id, e.item_id, e.ts.timestamp(), weights.of(e)) for e in events]


def views(user: str, n: int, items: int, start: float = 1_600_000_000.0) -> list[AnyEvent]:
    """n views of ``user``, item k % items at start + k seconds (later items weigh more)."""
    return [
        ViewEvent(
            type="view",
            event_id=f"{user}-{k}",
            user_id=user,
            item_id=f"i{k % items}",
            ts=datetime.fromtimestamp(start + k, UTC),
        )
        for k in range(n)
    ]


def test_caps_keep_the_newest_ids_and_heaviest_items_and_every_key_expires(ns: Namespace) -> None:
    params = FoldParams(seen_max=30, items_max=10, categories_max=2, idle_ttl_s=1000)
    client = redis_client(ns.settings)
    keys = Keys(ns.settings.key_prefix)
    for item, cats in {"i0": "A|B", "i1": "C", "i2": "D"}.items():
        client.hset(keys.item(item), "categories", cats)
    events = views("u", 100, items=25)
    aclient = async_redis_client(ns.settings)

    async def run() -> list[Folded]:
        try:
            script = FoldScript(aclient, ns.settings.key_prefix, params)
            return [
                r
                for batch in (events[:50], events[50:])
                for r in await script.run(group_by_user(rows_of(batch)))
            ]
        finally:
            await aclient.aclose()

    results = asyncio.run(run())
    try:
        assert sum(r.folded for r in results) == 100
        seen = [m.decode() for m in client.zrange(keys.seen("u"), 0, -1)]
        assert seen == [f"u-{k}" for k in range(70, 100)]  # the newest 30 ids
        # Items 0..24 each got 4 views; the later views of items 15..24 weigh more (decay), so
        # those ten are the heaviest.
        items = {k.decode() for k in client.hkeys(keys.profile_items("u"))}
        assert items == {f"i{k}" for k in range(15, 25)}
        assert client.hlen(keys.profile_categories("u")) == 2
        for key in keys.user_keys("u")[:5]:
            assert 0 < client.ttl(key) <= 1000, key
    finally:
        client.close()


def test_a_user_with_a_wrong_type_key_is_refused_whole_and_the_rest_folds(ns: Namespace) -> None:
    client = redis_client(ns.settings)
    keys = Keys(ns.settings.key_prefix)
    # Corruption of one user's state (planted by hand): its items key is a string.
    client.set(keys.profile_items("bad"), "not a hash")
    events = views("ok1", 3, 3) + views("bad", 3, 3) + views("ok2", 3, 3)
    aclient = async_redis_client(ns.settings)

    async def run() -> list[Folded]:
        try:
            return await FoldScript(aclient, ns.settings.key_prefix, FoldParams()).run(
                group_by_user(rows_of(events))
            )
        finally:
            await aclient.aclose()

    try:
        by_user = {r.user_id: r for r in asyncio.run(run())}
        assert by_user["bad"].rejected == "WRONGTYPE"
        assert by_user["ok1"].folded == by_user["ok2"].folded == 3
        # Nothing of the refused user was written: only the planted key exists.
        assert [client.exists(k) for k in keys.user_keys("bad")] == [0, 1, 0, 0, 0, 0]
        assert client.get(keys.profile_items("bad")) == b"not a hash"
    finally:
        client.close()


def test_items_new_to_a_profile_are_counted_once_per_day_in_the_fold(ns: Namespace) -> None:
    client = redis_client(ns.settings)
    keys = Keys(ns.settings.key_prefix)
    client.set(keys.profile_items("bad"), "not a hash")  # a refused user counts nothing
    day = 1_600_000_000 // 86_400
    first = views("u1", 6, 2) + views("u2", 1, 1) + views("bad", 3, 3)  # u1: i0, i1 three times
    # The next day u1 views i0 again and i2 for the first time: only i2 is new; the copy of the
    # first batch (same event ids) is a replay.
    later = [*views("u1", 1, 1, start=(day + 1) * 86_400.0 + 10), *first]
    later[0] = later[0].model_copy(update={"event_id": "u1-next-i0"})
    later.append(views("u1", 3, 3, start=(day + 1) * 86_400.0 + 20)[2])
    later[-1] = later[-1].model_copy(update={"event_id": "u1-next-i2"})
    counting = FoldParams(trending_ttl_s=3_600)

    def fold(params: FoldParams, events: list[AnyEvent]) -> list[Folded]:
        async def run() -> list[Folded]:
            aclient = async_redis_client(ns.settings)
            try:
                script = FoldScript(aclient, ns.settings.key_prefix, params)
                return await script.run(group_by_user(rows_of(events)))
            finally:
                await aclient.aclose()

        return asyncio.run(run())

    try:
        assert {r.user_id: r.rejected for r in fold(counting, first)}["bad"] == "WRONGTYPE"
        assert client.hgetall(keys.trending(day)) == {b"i0": b"2", b"i1": b"1"}
        assert 0 < client.ttl(keys.trending(day)) <= 3_600
        fold(counting, later)
        assert client.hgetall(keys.trending(day)) == {b"i0": b"2", b"i1": b"1"}
        assert client.hgetall(keys.trending(day + 1)) == {b"i2": b"1"}
        # Without trending_ttl_s (a rebuild, the defaults) nothing is counted.
        fold(FoldParams(), views("u3", 2, 2))
        assert client.hgetall(keys.trending(day)) == {b"i0": b"2", b"i1": b"1"}
    finally:
        client.close()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port (memory limits and ACLs stay out of the stack's)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    binary = shutil.which("redis-server")
    assert binary, "redis-server is required (the stack uses it too)"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*args, "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)  # readiness poll of a process we just started, not a test wait
        yield url
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


class Collect:
    """A folder's sender that keeps what it is given (the test reads it back)."""

    def __init__(self) -> None:
        self.records: list[tuple[bytes | None, bytes, list[tuple[str, bytes]] | None]] = []

    async def __call__(
        self, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
    ) -> None:
        self.records.append((key, value, headers))


def envelopes_of(events: list[AnyEvent]) -> list[Envelope]:
    return [
        Envelope("clicks", 0, n, e.user_id.encode(), e.model_dump_json().encode(), (), 1)
        for n, e in enumerate(events)
    ]


def test_out_of_memory_is_retried_then_stops_the_worker_with_nothing_written(
    own_redis: str,
) -> None:
    admin = redis.Redis.from_url(own_redis)
    settings = StreamsSettings(redis_url=own_redis, streams_redis_retry_s=1.0)
    keys = Keys(settings.key_prefix)
    events = views("u1", 5, 5) + views("u2", 5, 5)

    async def fold() -> Collect:
        client = redis.asyncio.Redis.from_url(own_redis)
        dlq, changed = Collect(), Collect()
        try:
            await ProfileFolder(settings, client, dlq, changed).handle(envelopes_of(events))
        finally:
            await client.aclose()
        return changed

    try:
        admin.set("ballast", b"x" * 4_000_000)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "1mb")
        # OOM is transient: retried for streams_redis_retry_s, then the worker must stop (not
        # ack, not spin), and no half-batch is left behind.
        with pytest.raises(StoreUnavailable, match="OutOfMemoryError"):
            asyncio.run(fold())
        assert not any(admin.exists(k) for u in ("u1", "u2") for k in keys.user_keys(u))
        # Memory back: the same batch (redelivered, uncommitted) folds and is announced.
        admin.delete("ballast")
        admin.config_set("maxmemory", "0")
        changed = asyncio.run(fold())
        assert sorted(k for k, _, _ in changed.records) == [b"u1", b"u2"]
    finally:
        admin.close()


def test_a_refusal_of_one_users_keys_is_isolated_to_that_user(own_redis: str) -> None:
    admin = redis.Redis.from_url(own_redis)
    # An ACL user that may touch item keys and every key with "ok" in it, not "denied"'s: Redis
    # refuses the script with NOPERM on that user's keys, a refusal that is not WRONGTYPE.
    admin.acl_setuser(
        "limited", enabled=True, passwords=["+pw"], keys=["*ok*", "item:*"], commands=["+@all"]
    )
    url = own_redis.replace("redis://", "redis://limited:pw@")
    settings = StreamsSettings(redis_url=url)
    keys = Keys(settings.key_prefix)
    events = views("ok1", 3, 3) + views("denied", 3, 3) + views("ok2", 3, 3)

    async def fold() -> tuple[Collect, Collect]:
        client = redis.asyncio.Redis.from_url(url)
        dlq, changed = Collect(), Collect()
        try:
            await ProfileFolder(settings, client, dlq, changed).handle(envelopes_of(events))
        finally:
            await client.aclose()
        return dlq, changed

    try:
        dlq, changed = asyncio.run(fold())
        assert sorted(k for k, _, _ in changed.records) == [b"ok1", b"ok2"]
        assert [k for k, _, _ in dlq.records] == [b"denied"] * 3
        for _, _, headers in dlq.records:
            found = dict(headers or [])
            assert found[HEADER_REASON] == b"store_rejected"
            # The error class only, never Redis's message (which may quote keys or data).
            assert found[HEADER_DETAIL] == b"Redis refused the user's keys: ResponseError"
        assert admin.hget(keys.profile("ok2"), "events") == b"3"
        assert not any(admin.exists(k) for k in keys.user_keys("denied"))
    finally:
        admin.close()
