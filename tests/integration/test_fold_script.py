"""The Lua fold in real Redis agrees with the pure-Python reference, rescaling included."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime

import pytest
import redis.asyncio

from recstream.keys import Keys
from schemas import ClickEvent, DwellEvent, Profile, ViewEvent
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
    client = redis.asyncio.Redis.from_url(ns.settings.redis_url.get_secret_value())
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
