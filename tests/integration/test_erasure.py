"""Erasure (GDPR art. 17) and export (art. 15) against the real Kafka and Redis.

After ``recstream users erase`` no key of the user is left anywhere but its erasure markers, the
look-alike users (prefixes of its id, glob look-alikes) are untouched, the stream worker counts
re-delivered old events as ``erased`` instead of folding them, a new event starts a new profile,
and a rebuild from the start of the topic (switched live) does not bring the history back.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
import redis.asyncio
from click.testing import CliRunner
from jsonschema import Draft202012Validator
from prometheus_client import REGISTRY

from api.app import erasure_refusal, served_openapi
from api.keys import add_key, new_key
from api.settings import ApiSettings
from cli.main import main
from cli.supervise import free_port
from ops.feed import produce
from ops.rebuild import ProfileRebuild, RebuildStats
from ops.settings import OpsSettings
from recstream.keys import Keys, escape
from recstream.security import async_redis_client, kafka_config, redis_client
from schemas import UserErased
from schemas.api import Scope
from schemas.erasure import ErasureReceipt, UserExport
from schemas.openapi import EXPORT_PATH, USER_PATH
from streams.erasure import Eraser, read_erasures, restore_markers
from streams.fold import FoldParams, FoldScript
from tests.api_contract import exchange
from tests.conftest import Namespace, settings_env
from tests.integration.streams_support import (
    Worker,
    counts,
    event,
    load_test_catalog,
    produce_events,
    wait_for,
)

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
VICTIM = "v:*{?"
# Prefixes of the victim's id and ids a careless glob would match.
OTHERS = ["v", "v:*", "v:*{", "v:x{?", "w"]


def history(users: list[str], per_user: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        event(f"{user}-{n}", user, "abcde"[n % 5], T0 + 60 * n)
        for n in range(start, start + per_user)
        for user in users
    ]


def client_of(ns: Namespace) -> redis.Redis:
    return redis_client(ns.settings)


def keys_of(client: redis.Redis, user: str) -> dict[str, Any]:
    """Every key in the whole Redis that names ``user`` (escaped), with a dump of its value."""
    found = client.scan_iter(match=f"*{{{escape(user)}}}*", count=1000)
    return {k.decode(): client.dump(k) for k in found}


def cli(ns: Namespace, *args: str) -> Any:
    result = CliRunner().invoke(main, list(args), env=settings_env(ns.settings))
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def records_total(port: int, topic: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("recs_records_total{") and f'topic="{topic}"' in line:
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            out[outcome] = float(line.rsplit(" ", 1)[1])
    return out


def test_fold_skips_the_erased_history_and_starts_a_new_profile(ns: Namespace) -> None:
    keys = Keys(ns.settings.key_prefix)
    client = client_of(ns)
    field = f"{ns.settings.topic_clickstream}:0"
    record = UserErased(
        user_id="gone", erased_at_ms=1, topic=ns.settings.topic_clickstream, watermarks={0: 10}
    )
    try:
        restore_markers(client, keys, [record])

        async def fold(batch: dict[str, list[tuple[Any, ...]]]) -> list[Any]:
            aclient = async_redis_client(ns.settings)
            try:
                script = FoldScript(aclient, ns.settings.key_prefix, FoldParams())
                return await script.run(batch, None, dict.fromkeys(batch, field))
            finally:
                await aclient.aclose()

        # Only erased history: nothing is written, not even an empty key.
        (only_old,) = asyncio.run(
            fold({"gone": [("e1", "a", T0, 1.0, 3), ("e2", "b", T0, 1.0, 9)]})
        )
        assert (only_old.erased, only_old.folded, only_old.version) == (2, 0, 0)
        assert not only_old.emit
        assert client.exists(*keys.user_keys("gone")) == 0
        # Old and new in one batch: the new one (offset >= 10) is a profile of its own.
        mixed, kept = asyncio.run(
            fold(
                {
                    "gone": [("e3", "c", T0 + 1, 1.0, 9), ("e4", "d", T0 + 2, 2.0, 10)],
                    "kept": [("k1", "a", T0, 1.0, 4)],
                }
            )
        )
        assert (mixed.erased, mixed.folded, mixed.version, mixed.new_items) == (1, 1, 1, ("d",))
        assert (kept.erased, kept.folded) == (0, 1)  # another user's marker-free fold
        assert client.hget(keys.profile("gone"), "events") == b"1"
        assert client.hkeys(keys.profile_items("gone")) == [b"d"]
        # The marker outlives the fold: no idle TTL on it.
        assert client.ttl(keys.erased("gone")) == -1
        # Another partition's offsets are not compared with this partition's watermark.
        (other,) = asyncio.run(fold({"gone": [("e5", "e", T0 + 3, 1.0)]}))
        assert (other.erased, other.folded) == (0, 1)
    finally:
        client.close()


def test_erase_leaves_no_key_and_the_history_never_comes_back(
    ns: Namespace, workers: Callable[..., Worker]
) -> None:
    load_test_catalog(ns.settings)
    users = [VICTIM, *OTHERS]
    produce_events(ns.settings, history(users, 6))
    port = free_port()
    worker = workers(RECSTREAM_STREAMS_METRICS_PORT=str(port))
    wait_for(lambda: counts(ns.settings, users) == dict.fromkeys(users, 6), "profiles")
    keys = Keys(ns.settings.key_prefix)
    client = client_of(ns)
    try:
        # A cached list and a privacy ledger (as the cache writer and the embeddings service
        # write them), and a rebuild copy with its checkpoint.
        for user in users:
            client.set(keys.recs(user), b'{"profile_version": 1}')
            client.hset(keys.privacy_ledger(user), mapping={"rho": "0.0359", "version": "1"})
        settings = OpsSettings(**ns.settings.model_dump())
        with ProfileRebuild(settings, "copy", progress=False) as rebuild:
            rebuild.run(rebuild.plan(from_beginning=True))
        copy = keys.namespace("copy")
        assert client.exists(copy.profile(VICTIM)) == 1
        others_before = {user: keys_of(client, user) for user in OTHERS}

        report = cli(ns, "users", "erase", VICTIM, "--yes")
        assert report["user_id"] == VICTIM
        assert report["deleted_keys"] == 7 + 5  # live: 5 profile kinds, list, ledger; the copy
        assert set(report["namespaces"]) == {keys.prefix, copy.prefix}
        # Nothing of the user is left anywhere but the markers that keep the history erased
        # (the live one and the unfinished rebuild's).
        assert set(keys_of(client, VICTIM)) == {keys.erased(VICTIM), copy.erased(VICTIM)}
        assert {user: keys_of(client, user) for user in OTHERS} == others_before
        (erasure,) = read_erasures(
            kafka_config(ns.settings), ns.settings.topic_users_erased
        ).values()
        assert erasure.user_id == VICTIM and sum(erasure.watermarks.values()) == 6 * len(users)

        # Twice, or a user nobody knows: harmless.
        assert cli(ns, "users", "erase", VICTIM, "--yes")["deleted_keys"] == 0
        assert cli(ns, "users", "erase", "nobody", "--yes")["deleted_keys"] == 0
        assert {user: keys_of(client, user) for user in OTHERS} == others_before

        # Redis comes back without the worker's offsets and without the live marker (restored
        # from an older backup): the worker reads the whole topic again and, from users.erased,
        # still counts the victim's old events as erased; one new event starts a new profile.
        assert worker.stop() == 0
        client.delete(keys.stream_offsets(ns.group("streams")), keys.erased(VICTIM))
        worker = workers(RECSTREAM_STREAMS_METRICS_PORT=str(port))
        produce_events(ns.settings, [event("new-1", VICTIM, "e", T0 + 3600)])
        wait_for(lambda: counts(ns.settings, [VICTIM]) == {VICTIM: 1}, "the new profile")
        topic = ns.settings.topic_clickstream
        wait_for(lambda: records_total(port, topic).get("in") == 6 * len(users) + 1, "all read")
        outcomes = records_total(port, topic)
        assert outcomes["erased"] == 6
        assert outcomes["folded"] == 1
        assert outcomes["in"] == sum(v for k, v in outcomes.items() if k != "in")
        assert worker.stop() == 0

        # A rebuild from the start of the topic, switched live, brings nothing back.
        result = CliRunner().invoke(
            main,
            [
                "replay",
                "profiles",
                "--from-beginning",
                "--switch",
                "--namespace",
                "again",
                "--no-progress",
            ],
            env=settings_env(ns.settings),
        )
        assert result.exit_code == 0, result.output
        assert "6 of erased users" in result.output
        assert counts(ns.settings, users) == {VICTIM: 1, **dict.fromkeys(OTHERS, 6)}
        assert client.hkeys(keys.profile_items(VICTIM)) == [b"e"]

        exported = cli(ns, "users", "export", VICTIM)
        assert exported["user_id"] == VICTIM
        assert exported["keys"]["profile"]["value"]["events"] == "1"
        assert exported["keys"]["seen"]["value"] == [["new-1", T0 + 3600]]
        partitions = {f"{topic}:{p}" for p in range(ns.settings.topic_partitions)}
        assert set(exported["keys"]["erased"]["value"]) == {"erased_at_ms", *partitions}
        assert "recs" not in exported["keys"] and "privacy" not in exported["keys"]
    finally:
        client.close()


def test_export_of_a_user_with_everything(ns: Namespace) -> None:
    keys = Keys(ns.settings.key_prefix)
    client = client_of(ns)
    try:
        client.hset(keys.profile("x"), mapping={"version": "2", "events": "3"})
        client.zadd(keys.seen("x"), {"e1": T0})
        client.set(keys.recs("x"), b'{"profile_version": 2, "items": []}')
        client.hset(keys.privacy_ledger("x"), "rho", "0.1")
        client.hset(keys.pending_changes("g", "t", 0), "x", b'[2, null, "x", 2]')
        with Eraser(ns.settings) as eraser:
            data = eraser.export("x").model_dump(mode="json")
        assert data["keys"]["profile"]["value"] == {"version": "2", "events": "3"}
        assert data["keys"]["seen"]["value"] == [["e1", T0]]
        assert data["keys"]["recs"]["value"] == {"profile_version": 2, "items": []}
        assert data["keys"]["privacy"]["value"] == {"rho": "0.1"}
        assert list(data["pending_notices"].values()) == [[2, None, "x", 2]]
        with Eraser(ns.settings) as eraser:
            assert eraser.export("y").keys == {}
    finally:
        client.close()


async def _requests(
    settings: ApiSettings, calls: list[tuple[str, str, dict[str, str]]]
) -> list[tuple[int, bytes]]:
    answers = await exchange(settings, [(method, path, h, None) for method, path, h in calls])
    return [(status, body) for status, _, body in answers]


def _conforms(settings: ApiSettings, method: str, path: str, status: int, body: bytes) -> None:
    document = served_openapi(settings)
    answer = document["paths"][path][method]["responses"][str(status)]
    schema = answer["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": document["components"]}).validate(
        json.loads(body)
    )


def test_the_api_erases_and_exports_with_the_admin_scope_only(
    ns: Namespace, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    admin, record = new_key([Scope.ADMIN], "ops")
    add_key(keys_file, record)
    reader, record = new_key([Scope.READ], "web")
    add_key(keys_file, record)
    settings = ApiSettings(**ns.settings.model_dump(), api_keys_file=keys_file)
    keys = Keys(ns.settings.key_prefix)
    client = client_of(ns)
    victim, bystander = "a*", "ab"
    try:
        for user in (victim, bystander):
            client.hset(keys.profile(user), mapping={"version": "1", "events": "1"})
            client.set(keys.recs(user), b'{"profile_version": 1}')
        path = f"/v1/users/{quote(victim, safe='')}"
        results = asyncio.run(
            _requests(
                settings,
                [
                    ("DELETE", path, {}),
                    ("DELETE", path, {"X-API-Key": reader}),
                    ("GET", f"{path}/export", {"X-API-Key": reader}),
                    ("GET", f"{path}/export", {"X-API-Key": admin}),
                    ("DELETE", path, {"X-API-Key": admin}),
                    ("DELETE", path, {"X-API-Key": admin}),
                ],
            )
        )
        assert [status for status, _ in results] == [401, 403, 403, 200, 200, 200], results
        _conforms(settings, "get", EXPORT_PATH, 200, results[3][1])
        assert UserExport.model_validate_json(results[3][1]).keys["recs"].value == {
            "profile_version": 1
        }
        _conforms(settings, "delete", USER_PATH, 200, results[4][1])
        first, again = (ErasureReceipt.model_validate_json(r[1]) for r in results[4:])
        assert (first.user_id, first.deleted_keys, again.deleted_keys) == (victim, 2, 0)
        assert set(keys_of(client, victim)) == {keys.erased(victim)}
        assert client.exists(keys.profile(bystander), keys.recs(bystander)) == 2

        # A deployment whose services have their own credentials but none for the eraser says
        # so, and deletes nothing.
        secrets = tmp_path / "secrets"
        for system in ("kafka", "redis"):
            (secrets / system).mkdir(parents=True)
            (secrets / system / "api").write_text("not-used")  # the API's own; no eraser's
        without = settings.model_copy(update={"secrets_dir": secrets})
        assert erasure_refusal(without) is not None
        ((status, body),) = asyncio.run(
            _requests(without, [("DELETE", f"/v1/users/{bystander}", {"X-API-Key": admin})])
        )
        assert status == 503 and json.loads(body)["error"]["code"] == "erasure_unavailable"
        assert client.exists(keys.profile(bystander), keys.recs(bystander)) == 2
    finally:
        client.close()


def test_stack_topics_get_their_retention_and_users_erased_is_compacted(ns: Namespace) -> None:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, ConfigResource, ResourceType

    from cli.stack import Stack

    settings = ns.settings
    # The topics exist already (an older stack): their configs are set all the same.
    created = Stack().create_topics(
        settings.topics(), settings.topic_partitions, configs=settings.topic_configs()
    )
    assert created == []
    admin = AdminClient(kafka_config(settings))
    wanted = [settings.topic_users_erased, settings.topic_dlq, settings.topic_clickstream]

    def configured() -> bool:
        # The broker answers with the new configs once its metadata has them (a moment).
        try:
            found = {
                resource.name: future.result(timeout=30)
                for resource, future in admin.describe_configs(
                    [ConfigResource(ResourceType.TOPIC, t) for t in wanted]
                ).items()
            }
        except KafkaException:  # the topics are new: not every broker view has them yet
            return False
        return all(
            found[topic][name].value == value
            for topic in wanted
            for name, value in settings.topic_configs()[topic].items()
        )

    wait_for(configured, "topic configs", timeout_s=15)
    assert settings.topic_configs()[settings.topic_users_erased]["cleanup.policy"] == "compact"


def test_an_erasure_during_a_rebuild_reaches_its_namespace(ns: Namespace) -> None:
    load_test_catalog(ns.settings)
    users = [VICTIM, "w"]
    produce_events(ns.settings, history(users, 10))
    keys = Keys(ns.settings.key_prefix)
    copy = keys.namespace("midway")
    client = client_of(ns)
    erased: list[int] = []

    def erase_once(stats: RebuildStats) -> None:
        # As soon as the rebuild has folded some of the victim's history into its namespace.
        if not erased and client.exists(copy.profile(VICTIM)):
            with Eraser(ns.settings) as eraser:
                erased.append(eraser.erase(VICTIM).receipt().deleted_keys)

    try:
        settings = OpsSettings(**ns.settings.model_dump(), replay_batch_size=4)
        with ProfileRebuild(settings, "midway", progress=False) as rebuild:
            stats = rebuild.run(rebuild.plan(from_beginning=True), after_batch=erase_once)
            assert erased and erased[0] == 5  # the namespace's copy of the victim
            # Some of the victim's events were folded (then deleted), the rest skipped.
            assert stats.folded > 10 and stats.erased > 0 and stats.folded + stats.erased == 20
            assert set(keys_of(client, VICTIM)) == {keys.erased(VICTIM), copy.erased(VICTIM)}
            rebuild.switch(rebuild.plan())
        assert counts(ns.settings, users) == {VICTIM: 0, "w": 10}
        assert set(keys_of(client, VICTIM)) == {keys.erased(VICTIM)}
    finally:
        client.close()


def test_records_on_users_erased_that_erase_nobody_are_counted(ns: Namespace) -> None:
    """Only admin and the eraser may write users.erased; what they write that is not a
    UserErased of the user in its key erases nobody and shows in a gauge for operators."""
    topic = ns.settings.topic_users_erased
    good = UserErased(user_id="gone", erased_at_ms=1, topic="clickstream", watermarks={0: 3})
    forged = good.model_copy(update={"user_id": "someone-else"})
    records = [
        (b"gone", good.model_dump_json().encode()),
        (b"broken", b"{not json"),
        (b"victim", forged.model_dump_json().encode()),  # another user's record under a key
    ]
    assert produce(ns.settings, topic, iter(records)) == 3
    found = read_erasures(kafka_config(ns.settings), topic)
    assert set(found) == {"gone"}
    assert REGISTRY.get_sample_value("recs_erasure_records_refused") == 2
