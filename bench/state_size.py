"""State-size benchmark: Redis bytes per user profile, as folded from real ML-100K events.

1. loads the ML-100K catalog under a fresh key prefix and folds the dataset's replay events
   (``ops.feed.events_for``: view + click + dwell per rating, ~318 events per user on average)
   with the live fold script (``streams/fold.lua``) and the default StreamsSettings bounds, in
   batches of ``--batch`` events in time order, as the worker would;
2. sums ``MEMORY USAGE <key> SAMPLES 0`` over each user's keys and prints the median, p99 and
   max bytes per user, and the bytes per key kind;
3. folds one synthetic user until every bound binds (``profile_seen_max`` events over more
   than ``profile_items_max`` distinct catalog items) and prints its bytes: the most one user
   can hold under the default settings (categories are bounded by the catalog's 19 genres here).

Run from the repository root: ``nice python -m bench.state_size``. Needs the local Redis
(``recstream stack up``) and the dataset under the data directory; its keys are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Iterable, Sequence

import orjson
import redis
import redis.asyncio

from lab.datasets import load_dataset
from ops.catalog import load_catalog
from ops.feed import dataset_tag, events_for
from recstream.keys import USER_KINDS, Keys
from schemas import parse_event
from streams.fold import FoldParams, FoldScript, Weights, group_by_user
from streams.settings import StreamsSettings

Row = tuple[str, str, str, float, float]


def percentile(values: Sequence[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def fold_all(url: str, prefix: str, params: FoldParams, rows: list[Row], batch: int) -> int:
    client = redis.asyncio.Redis.from_url(url)
    script = FoldScript(client, prefix, params)
    folded = 0
    try:
        for start in range(0, len(rows), batch):
            results = await script.run(group_by_user(rows[start : start + batch]))
            folded += sum(r.folded for r in results)
    finally:
        await client.aclose()
    return folded


def user_bytes(client: redis.Redis, keys: Keys, users: Iterable[str]) -> dict[str, list[int]]:
    """Per user, MEMORY USAGE of each of its keys (0 where the key does not exist)."""
    out: dict[str, list[int]] = {}
    pipe = client.pipeline(transaction=False)
    order = list(users)
    for user in order:
        for key in keys.user_keys(user):
            pipe.memory_usage(key, samples=0)
    replies = pipe.execute()
    width = len(USER_KINDS)
    for n, user in enumerate(order):
        out[user] = [int(r or 0) for r in replies[n * width : (n + 1) * width]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2000, help="events per fold call")
    args = parser.parse_args()
    settings = StreamsSettings(key_prefix=f"bench:{uuid.uuid4().hex[:8]}:")
    params = FoldParams.from_settings(settings)
    weights = Weights.from_settings(settings)
    url = settings.redis_url.get_secret_value()
    client = redis.Redis.from_url(url)
    keys = Keys(settings.key_prefix)
    try:
        data = load_dataset("ml-100k", settings.data_dir)
        load_catalog(client, keys, data)
        tag = dataset_tag(data)
        rows: list[Row] = []
        for index, it in enumerate(data.interactions):
            for body in events_for(index, it, tag):
                event = parse_event(orjson.dumps(body))
                rows.append(
                    (
                        event.user_id,
                        event.event_id,
                        event.item_id,
                        event.ts.timestamp(),
                        weights.of(event),
                    )
                )
        started = time.monotonic()
        folded = asyncio.run(fold_all(url, settings.key_prefix, params, rows, args.batch))
        fold_s = time.monotonic() - started
        per_event = {u: 0 for u in data.users}
        for user, *_ in rows:
            per_event[user] += 1
        sizes = user_bytes(client, keys, data.users)
        totals = [sum(v) for v in sizes.values()]
        print(
            f"ML-100K: {len(rows):,} events, {folded:,} folded, {len(sizes)} users, "
            f"fold {fold_s:.1f}s; bounds: seen {params.seen_max}, items {params.items_max}, "
            f"categories {params.categories_max}, recent {params.recent_max}, "
            f"idle TTL {params.idle_ttl_s}s"
        )
        print(
            f"events per user: median {statistics.median(per_event.values()):.0f}, "
            f"max {max(per_event.values())}"
        )
        print(
            f"bytes per user: median {statistics.median(totals):,.0f}, "
            f"p99 {percentile(totals, 0.99):,}, max {max(totals):,}"
        )
        for n, kind in enumerate(USER_KINDS[:5]):
            column = [v[n] for v in sizes.values()]
            print(
                f"  {kind:8s} median {statistics.median(column):>9,.0f}  "
                f"p99 {percentile(column, 0.99):>9,}"
            )

        # One user driven past every bound: seen_max events over 3 x items_max distinct items.
        items = sorted(data.items)[: 3 * params.items_max]
        heavy = "bench-heavy-user"
        start_ts = rows[-1][3] - params.seen_max
        synthetic: list[Row] = [
            (heavy, f"h-{k}", items[k % len(items)], start_ts + k, 1.0)
            for k in range(params.seen_max + 1000)
        ]
        asyncio.run(fold_all(url, settings.key_prefix, params, synthetic, args.batch))
        capped = user_bytes(client, keys, [heavy])[heavy]
        counts = (
            client.zcard(keys.seen(heavy)),
            client.hlen(keys.profile_items(heavy)),
            client.hlen(keys.profile_categories(heavy)),
            client.zcard(keys.profile_recent(heavy)),
        )
        print(
            f"at the caps (seen {counts[0]}, items {counts[1]}, categories {counts[2]}, "
            f"recent {counts[3]}): {sum(capped):,} bytes "
            f"({', '.join(f'{k} {b:,}' for k, b in zip(USER_KINDS, capped, strict=False))})"
        )
    finally:
        doomed = list(client.scan_iter(match=f"{settings.key_prefix}*", count=1000))
        for start in range(0, len(doomed), 1000):
            client.delete(*doomed[start : start + 1000])
        client.close()


if __name__ == "__main__":
    main()
