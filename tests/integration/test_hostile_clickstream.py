"""Hostile clickstream records against a live worker (real Kafka and Redis), in both deliveries.

Every hostile record must end on ``clickstream.dlq`` with its reason, the worker must stay up,
a victim user's profile must stay byte-for-byte as it was, ids built to collide with the victim's
keys must fold into keys of their own, good traffic sent after all of it must fold, and the
worker's ``recs_records_total`` must balance: in = folded + duplicate + dead_lettered + erased.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from cli.supervise import free_port
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from tests.conftest import Namespace
from tests.integration.streams_support import (
    Worker,
    consume,
    counts,
    event,
    load_test_catalog,
    wait_for,
)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
VICTIM = "victim"
# Valid ids that a naive "profile:{user}:..." layout would have mapped onto the victim's keys.
COLLIDING = ["victim:items", "victim:recent", "victim:profile", "victim}", "{victim}", "%76ictim"]
GOOD = ["good-1", "good-2", "good-3"]
# A valid event under headers a producer may set by mistake or malice: the worker reads none of
# a clickstream record's headers, so it must fold and announce it as usual.
JUNK_HEADERS: list[tuple[str, str | bytes | None]] = [
    ("recs.origin_ts", b"9" * 400),
    ("recs.origin_ts", b"-x"),
    ("\xff", b"\xff" * 4096),
]
HEADERS_USER = "good-headers"
WRONG_TYPE_USER = "mallory"


def body(eid: str, user: str = "h", **changes: Any) -> dict[str, Any]:
    out = event(eid, user, "a", T0, "click")
    out.update(changes)
    return out


def js(value: Any) -> bytes:
    return orjson.dumps(value)


def hostile_records() -> list[tuple[str, bytes | None, bytes | None, str]]:
    """(kind, key, value, expected dlq.reason); every (key, value) pair is unique."""
    nested = body("h-nested", context={"a": {"b": 1}})
    wide = body("h-wide", context={f"k{n}": n for n in range(40)})
    return [
        ("tombstone", b"h", None, "tombstone"),
        ("missing key", None, js(body("h-nokey")), "missing_key"),
        ("bad utf-8", b"h", b'{"schema_version": 1, "user_id": "\xff\xfe"}', "bad_utf8"),
        ("not json", b"h", b"this is not json", "bad_json"),
        ("json array", b"h", js([body("h-array")]), "not_object"),
        (
            "oversize",
            b"h",
            js(body("h-big", context={"pad": "x" * 200})) + b" " * 17000,
            "oversize",
        ),
        ("nested context", b"h", js(nested), "bad_context"),
        ("oversize context", b"h", js(wide), "bad_context"),
        ("NaN", b"h", js(body("h-nan")).replace(b'"click"', b'"dwell","dwell_ms":NaN'), "bad_json"),
        ("Infinity", b"h", js(body("h-inf")).replace(b"1,", b"Infinity,", 1), "bad_json"),
        ("1e309", b"h", js(body("h-1e309")).replace(b"1,", b"1e309,", 1), "bad_json"),
        ("negative dwell", b"h", js(body("h-neg", type="dwell", dwell_ms=-5)), "dwell_rules"),
        (
            "10^30 dwell",
            b"h",
            js(body("h-huge", type="dwell", dwell_ms=7)).replace(b":7", b":" + b"9" * 31),
            "dwell_rules",
        ),
        ("dwell on a click", b"h", js(body("h-dwclick", dwell_ms=5)), "dwell_rules"),
        ("unknown type", b"h", js(body("h-type", type="purchase")), "unknown_type"),
        (
            "schema_version 2",
            b"h",
            js(body("h-v2", schema_version=2)),
            "unsupported_schema_version",
        ),
        ("extra field", b"h", js(body("h-extra", price=3)), "extra_field"),
        ("empty user id", b"h", js(body("h-empty", user="")), "bad_id"),
        ("65-char id", b"u" * 65, js(body("h-65", user="u" * 65)), "bad_id"),
        ("control-char id", b"a\x07b", js(body("h-ctl", user="a\x07b")), "bad_id"),
        ("lone surrogate id", b"h", js(body("h-sur")).replace(b'"h"', b'"\\ud800"'), "bad_json"),
        ("key != user_id", VICTIM.encode(), js(body("h-steal")), "key_mismatch"),
        ("ts without offset", b"h", js(body("h-tz", ts="2024-01-01T00:00:00")), "bad_ts"),
        ("ts far in future", b"h", js(body("h-fut", ts="2999-01-01T00:00:00Z")), "ts_in_future"),
        ("year-1 ts", b"h", js(body("h-y1", ts="0001-01-01T00:00:00+01:00")), "bad_ts"),
        ("ts before 1970", b"h", js(body("h-1969", ts="1969-12-31T23:59:59Z")), "bad_ts"),
        (
            "wrong-type key in Redis",
            WRONG_TYPE_USER.encode(),
            js(body("h-wrongtype", user=WRONG_TYPE_USER)),
            "store_rejected",
        ),
    ]


def send(
    ns: Namespace,
    records: list[tuple[bytes | None, bytes | None]],
    headers: list[tuple[str, str | bytes | None]] | None = None,
) -> None:
    producer = idempotent_producer(ns.settings)
    for key, value in records:
        producer.produce(ns.settings.topic_clickstream, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0, "records not delivered"


def snapshot(client: redis.Redis, keys: Keys, user: str) -> list[bytes | None]:
    """DUMP of every key of the user: equal snapshots mean byte-for-byte equal state."""
    return [client.dump(key) for key in keys.user_keys(user)]


def records_total(port: int, topic: str) -> dict[str, float]:
    """The worker's ``recs_records_total{service="streams", topic}`` by outcome."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for match in re.finditer(r"^recs_records_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if labels.get("service") == "streams" and labels.get("topic") == topic:
            out[labels["outcome"]] = float(match.group(2))
    return out


@pytest.fixture(params=["agent", "batch"])
def worker(
    ns: Namespace, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Worker, int]]:
    """A worker in one delivery mode (the test runs in both) and its metrics port."""
    port = free_port()
    env = {"RECSTREAM_STREAMS_DELIVERY": request.param, "RECSTREAM_STREAMS_METRICS_PORT": str(port)}
    started = Worker(ns.settings, ns.group("streams"), tmp_path, env).start()
    yield started, port
    started.stop()


def test_hostile_records_are_dead_lettered_and_touch_no_one_else(
    ns: Namespace, worker: tuple[Worker, int]
) -> None:
    load_test_catalog(ns.settings)
    keys = Keys(ns.settings.key_prefix)
    client = redis.Redis.from_url(ns.settings.redis_url.get_secret_value())
    running, port = worker
    topic = ns.settings.topic_clickstream
    try:
        # The victim's profile first, and a user whose state someone damaged by hand.
        victim = [event(f"v-{n}", VICTIM, "abcde"[n % 5], T0 + n, "view") for n in range(6)]
        send(ns, [(VICTIM.encode(), js(e)) for e in victim])
        wait_for(lambda: counts(ns.settings, [VICTIM]) == {VICTIM: 6}, "victim folded")
        before = snapshot(client, keys, VICTIM)
        client.set(keys.profile_items(WRONG_TYPE_USER), b"planted")

        hostile = hostile_records()
        assert len({kind for kind, *_ in hostile}) >= 18
        assert len({(k, v) for _, k, v, _ in hostile}) == len(hostile)
        colliding = [event(f"c-{n}", u, "b", T0 + n, "click") for n, u in enumerate(COLLIDING)]
        good = [event(f"g-{u}-{n}", u, "c", T0 + n, "view") for u in GOOD for n in range(4)]
        replayed = [good[0]]  # sent twice: the second one is a duplicate
        send(ns, [(k, v) for _, k, v, _ in hostile])
        send(ns, [(e["user_id"].encode(), js(e)) for e in colliding + good + replayed])
        junk = event("j-1", HEADERS_USER, "d", T0, "click")
        send(ns, [(HEADERS_USER.encode(), js(junk))], JUNK_HEADERS)
        total = len(victim) + len(hostile) + len(colliding) + len(good) + len(replayed) + 1

        wait_for(lambda: counts(ns.settings, GOOD) == dict.fromkeys(GOOD, 4), "good traffic")
        assert counts(ns.settings, COLLIDING) == dict.fromkeys(COLLIDING, 1)
        wait_for(lambda: counts(ns.settings, [HEADERS_USER])[HEADERS_USER] == 1, "junk headers")
        changed = consume(
            ns.settings.topic_profiles_changed,
            ns.settings,
            lambda rs: any(r.key == HEADERS_USER.encode() for r in rs),
        )
        (notice,) = [r for r in changed if r.key == HEADERS_USER.encode()]
        # Its origin is the record's own Kafka timestamp, not the 400 digits it carried.
        assert len(notice.headers["recs.origin_ts"]) == 13, notice.headers
        dead = consume(ns.settings.topic_dlq, ns.settings, lambda rs: len(rs) >= len(hostile))
        expected = {(k, v or b""): (kind, reason) for kind, k, v, reason in hostile}
        got = {(r.key, r.value): r.headers["dlq.reason"].decode() for r in dead}
        wrong = {kind: (reason, got.get(kv)) for kv, (kind, reason) in expected.items()}
        assert {kind: pair for kind, pair in wrong.items() if pair[0] != pair[1]} == {}
        assert len(dead) == len(hostile)
        for record in dead:
            assert record.headers["dlq.source.topic"] == topic.encode()
            assert record.headers["dlq.detail"]

        # The victim's every key is byte-for-byte as before; the damaged user is untouched.
        assert snapshot(client, keys, VICTIM) == before
        assert client.get(keys.profile_items(WRONG_TYPE_USER)) == b"planted"
        assert not client.exists(keys.profile(WRONG_TYPE_USER))

        wait_for(
            lambda: records_total(port, topic).get("in") == total,
            f"recs_records_total in == {total}",
        )
        outcome = records_total(port, topic)
        assert outcome["in"] == (
            outcome["folded"]
            + outcome.get("duplicate", 0)
            + outcome["dead_lettered"]
            + outcome.get("erased", 0)
        )
        assert outcome.get("erased", 0) == 0  # nobody was erased
        assert outcome["dead_lettered"] == len(hostile)
        assert outcome["duplicate"] == len(replayed)
        assert running.child is not None and running.child.returncode is None, running.log_tail()
    finally:
        client.close()
