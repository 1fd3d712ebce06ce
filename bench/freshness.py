"""Freshness benchmark: clickstream event → fresh recommendations in the Redis cache.

1. makes fresh topics, consumer groups and a Redis prefix, loads the ML-100K catalog, and starts
   the whole pipeline as `recstream run` does (Faust worker, regeneration consumer with its pool,
   cache writer, read API; child processes);
2. replays ML-100K in time order at a fixed rate (default 200 events/s), each event stamped with
   its production time, and watches ``recs:{user}``: an event is fresh once the cached list's
   ``trigger_ts`` reaches the event's ts. Freshness is measured for the ``view`` that opens each
   rating (a new item, so always a meaningful change);
3. meanwhile reads the API in a bounded loop (loopback, one keep-alive connection) for latency,
   with a read-scoped API key, as a deployed frontend would;
4. after the pipeline stops, saturates a worker pool alone with every ML-100K user's history to
   measure the regenerations per second it sustains.

Run from the repository root: ``nice python -m bench.freshness [--rate 200] [--seconds 30]``.
Prints a table. Everything it creates (topics, keys) is deleted at the end.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import multiprocessing as mp
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import orjson
import redis
from confluent_kafka import Producer

from api.keys import add_key, new_key
from bench.common import percentile
from cli.run import Pipeline
from cli.stack import Stack
from cli.supervise import free_port
from consumers.regen import build_pool
from consumers.settings import RegenSettings
from inference.pool import PoolResult, PoolSaturatedError
from lab.datasets import Dataset, load_dataset
from ops.catalog import load_catalog
from ops.feed import dataset_tag, events_for
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.security import redis_client
from recstream.settings import CommonSettings
from schemas.api import Scope


def wait_http(port: int, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise SystemExit(f"127.0.0.1:{port}{path} not healthy after {timeout:.0f}s")


class Watcher(threading.Thread):
    """Polls the cache for users with unanswered events and records their freshness."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        super().__init__(daemon=True)
        self.client, self.keys = client, keys
        self.lock = threading.Lock()
        self.outstanding: dict[str, list[tuple[float, float]]] = {}  # user -> (ts, produced)
        self.fresh: list[float] = []
        self.stop = threading.Event()

    def expect(self, user: str, ts: float, produced: float) -> None:
        with self.lock:
            self.outstanding.setdefault(user, []).append((ts, produced))

    def pending(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.outstanding.values())

    def run(self) -> None:
        while not self.stop.is_set():
            with self.lock:
                users = list(self.outstanding)
            if users:
                values = self.client.mget([self.keys.recs(u) for u in users])
                seen = time.time()
                with self.lock:
                    for user, raw in zip(users, values, strict=True):
                        if raw is None:
                            continue
                        trigger = datetime.fromisoformat(orjson.loads(raw)["trigger_ts"])
                        reached = trigger.timestamp() + 1e-4
                        waiting = self.outstanding.get(user, [])
                        done = [(ts, p) for ts, p in waiting if ts <= reached]
                        self.fresh.extend(seen - p for _, p in done)
                        left = [(ts, p) for ts, p in waiting if ts > reached]
                        if left:
                            self.outstanding[user] = left
                        else:
                            self.outstanding.pop(user, None)
            time.sleep(0.002)


def api_load(  # noqa: PLR0917 - the spawned process's arguments
    port: int, key: str, users: list[str], rate: float, stop: EventType, out: Connection
) -> None:
    """Sequential GETs over one keep-alive connection at a bounded rate; sends back latencies.

    Runs in its own process: a thread beside the producer and the watcher would wait for the
    GIL (up to its 5 ms switch interval) and measure that instead of the API.
    """
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    rng = random.Random(7)
    latencies: list[float] = []
    errors = 0
    next_at = time.monotonic()
    while not stop.is_set():
        user = rng.choice(users)
        started = time.perf_counter()
        conn.request("GET", f"/v1/users/{user}/recommendations", headers={"X-API-Key": key})
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            errors += 1
        next_at += 1.0 / rate
        time.sleep(max(next_at - time.monotonic(), 0.0))
    conn.close()
    out.send((latencies, errors))


class ApiLoad:
    """:func:`api_load` in a spawned process."""

    def __init__(self, port: int, key: str, users: list[str], rate: float) -> None:
        ctx = mp.get_context("spawn")
        self._stop = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=api_load, args=(port, key, users, rate, self._stop, send), daemon=True
        )

    def start(self) -> None:
        self._process.start()

    def finish(self) -> tuple[list[float], int]:
        self._stop.set()
        latencies, errors = self._recv.recv()
        self._process.join(10)
        return list(latencies), int(errors)


def replay(
    ds: Dataset, producer: Producer, topic: str, watcher: Watcher, *, rate: float, seconds: float
) -> int:
    """Produce the replay at ``rate`` events/s for ``seconds``; returns events produced."""
    tag = dataset_tag(ds) + uuid.uuid4().hex.encode()  # fresh event ids: not a re-replay
    total = int(rate * seconds)
    started = time.monotonic()
    sent = 0
    for index, it in enumerate(ds.interactions):
        for event in events_for(index, it, tag):
            if sent >= total:
                producer.flush(10)
                return sent
            due = started + sent / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = time.time()
            event["ts"] = datetime.fromtimestamp(now, UTC).isoformat()
            if event["type"] == "view":
                watcher.expect(it.user_id, now, now)
            producer.produce(topic, key=it.user_id.encode(), value=orjson.dumps(event))
            producer.poll(0)
            sent += 1
    producer.flush(10)
    return sent


def pool_throughput(settings: RegenSettings, ds: Dataset, requests: int) -> dict[str, float]:
    """Saturate a pool alone: every user's recent history, as fast as its queue accepts."""
    histories = [[it.item_id for it in h][-50:] for h in ds.histories().values()]
    pool = build_pool(settings).start()
    try:
        futures: list[Future[PoolResult]] = []
        started = time.perf_counter()
        n = 0
        while n < requests:
            try:
                futures.append(pool.submit(histories[n % len(histories)], settings.regen_k))
                n += 1
            except PoolSaturatedError:
                futures[-1].result(30)
        results = [f.result(60) for f in futures]
        elapsed = time.perf_counter() - started
    finally:
        pool.close()
    fallbacks = sum(r.source == "fallback" for r in results)
    return {"per_s": requests / elapsed, "fallbacks": fallbacks, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="Events per second.")
    parser.add_argument("--seconds", type=float, default=30.0, help="Replay duration.")
    parser.add_argument("--api-rate", type=float, default=100.0, help="API reads per second.")
    parser.add_argument("--debounce-ms", type=float, default=20.0)
    parser.add_argument("--streams-batch-within-s", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--pool-requests", type=int, default=5000)
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="Serve this trained artifact (default: CF)."
    )
    args = parser.parse_args()

    token = uuid.uuid4().hex[:8]
    base = CommonSettings()
    names = {
        "topic_clickstream": f"bench-clickstream-{token}",
        "topic_dlq": f"bench-clickstream.dlq-{token}",
        "topic_profiles_changed": f"bench-profiles.changed-{token}",
        "topic_recommendations": f"bench-recommendations-{token}",
        "topic_profiles_changed_dlq": f"bench-profiles.changed.dlq-{token}",
        "topic_recommendations_dlq": f"bench-recommendations.dlq-{token}",
        "topic_profile_embeddings": f"bench-profiles.embeddings-{token}",
    }
    settings = base.model_copy(update={"key_prefix": f"bench:{token}:", **names})
    Stack().create_topics(settings.topics(), settings.topic_partitions)
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    ds = load_dataset("ml-100k", settings.data_dir)
    load_catalog(client, keys, ds)

    api_port, regen_port, cache_port = free_port(), free_port(), free_port()
    keys_file = Path(tempfile.mkdtemp(prefix="recstream-bench-")) / "api-keys.jsonl"
    api_key, api_record = new_key([Scope.READ], "bench-freshness")
    add_key(keys_file, api_record)
    env = {
        **os.environ,
        **{f"RECSTREAM_{k.upper()}": v for k, v in names.items()},
        "RECSTREAM_KEY_PREFIX": settings.key_prefix,
        "RECSTREAM_REGEN_GROUP_ID": f"bench-regen-{token}",
        "RECSTREAM_CACHE_GROUP_ID": f"bench-cache-{token}",
        "RECSTREAM_STREAMS_APP_ID": f"bench-streams-{token}",
        "RECSTREAM_STREAMS_DATADIR": tempfile.mkdtemp(prefix="recstream-bench-"),
        "RECSTREAM_STREAMS_BATCH_WITHIN_S": str(args.streams_batch_within_s),
        "RECSTREAM_STREAMS_LOGLEVEL": "warning",
        "RECSTREAM_REGEN_DEBOUNCE_MS": str(args.debounce_ms),
        "RECSTREAM_REGEN_POOL__WORKERS": str(args.workers),
        "RECSTREAM_API_PORT": str(api_port),
        "RECSTREAM_API_METRICS_PORT": str(free_port()),
        "RECSTREAM_API_KEYS_FILE": str(keys_file),
        "RECSTREAM_REGEN_METRICS_PORT": str(regen_port),
        "RECSTREAM_CACHE_METRICS_PORT": str(cache_port),
    }
    if args.model_dir is not None:
        env["RECSTREAM_REGEN_MODEL_DIR"] = str(args.model_dir)
    pipeline = Pipeline(
        args={
            "regen": ["--loglevel", "warning"],
            "cache-writer": ["--loglevel", "warning"],
            "api": ["--loglevel", "warning"],
        },
        env=env,
    )
    producer = idempotent_producer(settings, linger_ms=0)
    watcher = Watcher(client, keys)
    results: dict[str, Any] = {}
    try:
        pipeline.start()
        wait_http(regen_port, "/healthz", 180)
        wait_http(api_port, "/healthz", 60)
        # Readiness of the whole chain: one probe event must come out in the cache.
        watcher.start()
        probe_item = next(iter(ds.items))
        probe_ts = time.time()
        watcher.expect("bench-probe", probe_ts, probe_ts)
        probe = {
            "schema_version": 1,
            "event_id": f"probe-{token}",
            "type": "view",
            "user_id": "bench-probe",
            "item_id": probe_item,
            "ts": datetime.fromtimestamp(probe_ts, UTC).isoformat(),
        }
        producer.produce(names["topic_clickstream"], key=b"bench-probe", value=orjson.dumps(probe))
        producer.flush(10)
        deadline = time.monotonic() + 120
        while watcher.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        if watcher.pending():
            raise SystemExit("the pipeline did not answer the probe event within 120 s")
        with watcher.lock:
            watcher.fresh.clear()
        print(f"pipeline ready; replaying {args.rate:.0f} events/s for {args.seconds:.0f}s")

        users = list(dict.fromkeys(it.user_id for it in ds.interactions[:5000]))
        api = ApiLoad(api_port, api_key, users, args.api_rate)
        api.start()
        started = time.monotonic()
        topic = names["topic_clickstream"]
        sent = replay(ds, producer, topic, watcher, rate=args.rate, seconds=args.seconds)
        produced_s = time.monotonic() - started
        deadline = time.monotonic() + 10
        while watcher.pending() and time.monotonic() < deadline:
            time.sleep(0.05)
        api_latencies, api_errors = api.finish()
        # The same reads with the pipeline idle, to tell the API's cost from CPU contention.
        idle = ApiLoad(api_port, api_key, users, args.api_rate)
        idle.start()
        time.sleep(5)
        idle_latencies, _ = idle.finish()
        watcher.stop.set()
        watcher.join(5)
        results.update(
            sent=sent,
            achieved_rate=sent / produced_s,
            fresh=list(watcher.fresh),
            unanswered=watcher.pending(),
            api=api_latencies,
            api_errors=api_errors,
            api_idle=idle_latencies,
        )
    finally:
        pipeline.stop()

    regen = RegenSettings(regen_pool={"workers": args.workers}, regen_model_dir=args.model_dir)
    pool = pool_throughput(regen, ds, args.pool_requests)

    ms = 1000.0
    fresh = results["fresh"]
    rows = [
        ("events produced", f"{results['sent']} at {results['achieved_rate']:.0f}/s", ""),
        ("views measured", f"{len(fresh)} ({results['unanswered']} unanswered)", ""),
        ("freshness p50", f"{percentile(fresh, 0.5) * ms:.1f} ms", "≤ 100 ms"),
        ("freshness p99", f"{percentile(fresh, 0.99) * ms:.1f} ms", "≤ 500 ms"),
        ("freshness mean", f"{statistics.fmean(fresh) * ms:.1f} ms" if fresh else "n/a", ""),
        ("pool regenerations/s", f"{pool['per_s']:.0f} ({pool['fallbacks']} fallbacks)", "≥ 200"),
        ("API reads", f"{len(results['api'])} ({results['api_errors']} non-200)", ""),
        ("API p50", f"{percentile(results['api'], 0.5) * ms:.2f} ms", ""),
        ("API p99", f"{percentile(results['api'], 0.99) * ms:.2f} ms", "≤ 5 ms"),
        (
            "API p50 / p99 idle",
            f"{percentile(results['api_idle'], 0.5) * ms:.2f} / "
            f"{percentile(results['api_idle'], 0.99) * ms:.2f} ms",
            "",
        ),
    ]
    load = os.getloadavg()[0]
    print(
        f"\nrecstream freshness benchmark ({os.cpu_count()} CPU cores, load average {load:.1f}, "
        f"pool workers={args.workers}, debounce {args.debounce_ms:.0f} ms, "
        f"model {args.model_dir or 'co-occurrence CF'})"
    )
    print(f"{'measure':<22} {'value':<32} goal")
    for name, value, goal in rows:
        print(f"{name:<22} {value:<32} {goal}")

    Stack().delete_topics(settings.topics())
    while batch := list(itertools.islice(client.scan_iter(f"{settings.key_prefix}*", 1000), 1000)):
        client.delete(*batch)
    client.close()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
