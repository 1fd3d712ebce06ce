"""Ingest benchmark: how fast ONE stream worker drains a clickstream backlog into Redis profiles.

1. loads the ML-100K catalog and pre-produces ``--events`` (default 300,000, the whole replay)
   clickstream events to a fresh topic;
2. starts one Faust worker (``streams.app.build_app``) in this process on a fresh consumer group
   and Redis prefix, in the chosen delivery mode (``--delivery agent|batch``), and lets it drain;
3. prints events/s (first batch received to last batch committed) and the per-event fold latency
   (arrival in the worker to profile committed in Redis), p50/p99.

Run from the repository root: ``nice python -m bench.ingest [--delivery batch] [--events N]``.
The topics, keys and Faust state folder it makes are deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from cli.stack import Stack
from lab.datasets import load_dataset
from ops.catalog import load_catalog
from ops.feed import produce, replay_records
from recstream.keys import Keys
from recstream.security import redis_client
from schemas import Envelope
from streams.app import build_app
from streams.fold import Folded
from streams.settings import StreamsSettings


def percentile(sorted_values: Sequence[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    parser.add_argument("--no-fast-drain", action="store_true")
    parser.add_argument("--delivery", choices=["agent", "batch"], default="agent")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import asyncio

        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())  # as `recstream serve streams`

    token = uuid.uuid4().hex[:8]
    overrides: dict[str, Any] = {
        "key_prefix": f"bench:{token}:",
        "topic_clickstream": f"bench-clickstream-{token}",
        "topic_dlq": f"bench-dlq-{token}",
        "topic_profiles_changed": f"bench-changed-{token}",
        "streams_app_id": f"bench-ingest-{token}",
        "streams_loglevel": "warning",
    }
    overrides["streams_fast_drain"] = not args.no_fast_drain
    overrides["streams_delivery"] = args.delivery
    overrides["streams_event_loop"] = args.loop
    if args.batch_size:
        overrides["streams_batch_size"] = args.batch_size
    settings = StreamsSettings(**overrides)
    topics = [settings.topic_clickstream, settings.topic_dlq, settings.topic_profiles_changed]
    Stack().create_topics(topics, args.partitions)
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    try:
        data = load_dataset("ml-100k", settings.data_dir)
        load_catalog(client, keys, data)
        t0 = time.monotonic()
        produced = produce(
            settings,
            settings.topic_clickstream,
            replay_records(data, args.events),
            timeout_s=120,
        )
        print(f"pre-produced {produced} events in {time.monotonic() - t0:.1f}s")

        app, folder = build_app(settings)
        latencies: list[float] = []
        batches: list[tuple[float, int]] = []
        state = {"first": 0.0, "last": 0.0, "records": 0, "folded": 0}

        def on_batch(records: int, lat: Sequence[float], results: Sequence[Folded]) -> None:
            now = time.monotonic()
            if not state["records"]:
                state["first"] = now - max(lat)
            state["records"] += records
            state["folded"] += sum(r.folded for r in results)
            state["last"] = now
            latencies.extend(lat)
            batches.append((now, records))
            if state["records"] >= produced:
                os.kill(os.getpid(), signal.SIGTERM)

        folder.hooks.append(on_batch)
        # Time spent in the fold handler itself (validation, Redis, sends), to show where the
        # rest of the worker's time goes (Faust's consumer and stream machinery).
        handle = folder.handle
        busy = [0.0]

        async def timed_handle(
            records: Sequence[Envelope], arrived: Sequence[float | None] | None = None
        ) -> None:
            began = time.perf_counter()
            try:
                await handle(records, arrived)
            finally:
                busy[0] += time.perf_counter() - began

        folder.handle = timed_handle  # type: ignore[method-assign]  # instrumenting the bench run
        from faust import Worker

        with contextlib.suppress(SystemExit):  # the worker exits the process when it stops
            Worker(app, loglevel="warning", quiet=True).execute_from_commandline()

        elapsed = state["last"] - state["first"]
        latencies.sort()
        sizes = [n for _, n in batches]
        profiles = sum(1 for _ in client.scan_iter(match=keys.user_pattern("profile"), count=1000))
        rows = [
            ("events drained", f"{state['records']:,}"),
            ("events folded", f"{state['folded']:,}"),
            ("profiles in Redis", f"{profiles:,}"),
            ("wall time (s)", f"{elapsed:.2f}"),
            ("drain rate (events/s)", f"{state['records'] / elapsed:,.0f}"),
            ("fold latency p50 (ms)", f"{1000 * percentile(latencies, 0.50):.1f}"),
            ("fold latency p99 (ms)", f"{1000 * percentile(latencies, 0.99):.1f}"),
            ("fold handler time, summed (s)", f"{busy[0]:.2f}"),
            ("batches", f"{len(batches)}"),
            ("batch size median", f"{statistics.median(sizes):.0f}"),
            ("batch size setting", f"{settings.streams_batch_size}"),
            ("partitions", f"{args.partitions}"),
            ("delivery", args.delivery),
        ]
        width = max(len(name) for name, _ in rows)
        print(f"\n{'metric':<{width}} | value\n{'-' * width}-+-{'-' * 12}")
        for name, value in rows:
            print(f"{name:<{width}} | {value:>12}")
    finally:
        Stack().delete_topics(topics)
        stale = list(client.scan_iter(match=f"{settings.key_prefix}*", count=1000))
        for start in range(0, len(stale), 1000):
            client.delete(*stale[start : start + 1000])
        client.close()
        shutil.rmtree(settings.streams_datadir / settings.streams_app_id, ignore_errors=True)


if __name__ == "__main__":
    main()
