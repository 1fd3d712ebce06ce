"""Replay benchmark: how fast `replay profiles` rebuilds profiles, and what a switch costs.

1. loads the ML-100K catalog under a fresh Redis prefix and produces ``--events`` clickstream
   events (default 300,000, the whole replay) to a fresh topic;
2. ``--runs`` times: rebuilds every profile from the topic into a new namespace
   (:class:`ops.rebuild.ProfileRebuild`, the live agent's fold) and switches it live; the first
   switch fills an empty live namespace, later ones replace full profiles;
3. prints records/s per rebuild and how long each atomic switch held Redis, with medians.

Run from the repository root: ``nice python -m bench.replay [--events N] [--runs N]``. The topic
and keys it makes are deleted at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

from cli.stack import Stack
from lab.datasets import load_dataset
from ops.catalog import load_catalog
from ops.feed import produce, replay_records
from ops.rebuild import ProfileRebuild
from ops.settings import OpsSettings
from recstream.keys import Keys
from recstream.security import redis_client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=2000)
    args = parser.parse_args()

    token = uuid.uuid4().hex[:8]
    base = OpsSettings()
    settings = base.model_copy(
        update={
            "key_prefix": f"bench-replay-{token}:",
            "topic_clickstream": f"bench-replay-{token}",
            "replay_batch_size": args.batch_size,
        }
    )
    client = redis_client(settings)
    Stack().create_topics([settings.topic_clickstream], settings.topic_partitions)
    try:
        data = load_dataset("ml-100k", settings.data_dir)
        load_catalog(client, Keys(settings.key_prefix), data)
        produced = produce(
            settings,
            settings.topic_clickstream,
            replay_records(data, args.events),
        )
        print(f"produced {produced} events of ml-100k to {settings.topic_clickstream}")
        rates, switches = [], []
        print(
            f"{'run':>3} {'records':>8} {'users':>6} {'rebuild s':>9} {'records/s':>9} "
            f"{'switch ms':>9} {'replaced':>8}"
        )
        for run in range(args.runs):
            seen_sets = Keys(settings.key_prefix).user_pattern("seen")
            replaced = sum(1 for _ in client.scan_iter(match=seen_sets))
            with ProfileRebuild(settings, f"run{run}", progress=False) as rebuild:
                started = time.perf_counter()
                stats = rebuild.run(rebuild.plan(from_beginning=True))
                took = time.perf_counter() - started
                result = rebuild.switch(rebuild.plan())
            rates.append(stats.records / took)
            switches.append(result.script_s * 1000)
            print(
                f"{run:>3} {stats.records:>8} {len(stats.users):>6} {took:>9.2f} "
                f"{rates[-1]:>9.0f} {switches[-1]:>9.1f} {replaced:>8}"
            )
        print(
            f"median: {statistics.median(rates):.0f} records/s rebuilt, "
            f"switch {statistics.median(switches):.1f} ms"
        )
    finally:
        Stack().delete_topics([settings.topic_clickstream])
        keys = list(client.scan_iter(match=f"{settings.key_prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()


if __name__ == "__main__":
    main()
