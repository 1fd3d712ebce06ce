"""The secure stack (`recstream stack up --secure`): the pipeline runs end to end with one
principal per service, and Kafka and Redis refuse every principal what it has no right to.

The module starts its own secure Kafka and Redis on free ports in a temporary stack dir (once),
so the shared development stack is not touched.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from cli.stack import Stack, StackSettings
from cli.supervise import Child, free_port, free_port_pair, http_ok
from lab.datasets import load_dataset
from ops.feed import produce, replay_records
from recstream.keys import Keys
from recstream.security import PRINCIPALS, kafka_config, redis_client
from recstream.settings import ENV_PREFIX, CommonSettings
from schemas.conversation import session_key
from tests.conftest import settings_env

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Secure:
    stack: Stack
    settings: CommonSettings  # the stack's addresses and secrets dir; clients pick a principal
    said: list[str]

    def secret(self, system: str, principal: str) -> str:
        return (self.stack.secrets / system / principal).read_text().strip()


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("secure-stack")
    redis_port = free_port()
    stack_settings = StackSettings(
        stack_dir=root,
        kafka_bootstrap=f"127.0.0.1:{free_port_pair(redis_port)}",
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        stack_kafka_heap="512m",
        stack_secure=True,
        secrets_dir=None,
    )
    stack = Stack(stack_settings)
    # The broker's jars: the shared stack's resolved copy (same pom), not a second Maven run.
    shared_libs = StackSettings().stack_dir / "kafka" / "libs"
    if (shared_libs / ".pom.sha").exists():
        shutil.copytree(shared_libs, stack.kafka_libs)
    said: list[str] = []
    try:
        stack.up(say=said.append)
        common = stack_settings.model_dump(include=set(CommonSettings.model_fields))
        settings = CommonSettings(**{**common, "secrets_dir": stack.secrets})
        yield Secure(stack, settings, said)
    finally:
        stack.down(say=lambda _: None)


# -- secrets -----------------------------------------------------------------------------------


def test_secrets_are_private_files_and_never_printed(secure: Secure) -> None:
    secrets = secure.stack.secrets
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    printed = "\n".join(secure.said) + json.dumps(secure.stack.status())
    logs = "".join(p.read_text(errors="replace") for p in secure.stack.logs.glob("*.log"))
    for system in ("kafka", "redis"):
        for principal in PRINCIPALS:
            path = secrets / system / principal
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            password = secure.secret(system, principal)
            assert len(password) >= 32
            assert password not in printed
            assert password not in logs
            assert password not in repr(secure.settings)
    # Redis keeps only digests; the broker's properties (admin's password) only its owner reads.
    acl = secure.stack.redis_acl.read_text()
    assert secure.secret("redis", "api") not in acl
    assert stat.S_IMODE(secure.stack.redis_acl.stat().st_mode) == 0o600
    props = secure.stack.dir / "kafka" / "server.properties"
    assert stat.S_IMODE(props.stat().st_mode) == 0o600


# -- Kafka refusals ------------------------------------------------------------------------------


def test_kafka_refuses_clients_without_credentials_or_with_a_wrong_password(
    secure: Secure,
) -> None:
    anonymous = {"bootstrap.servers": secure.settings.kafka_bootstrap}
    assert _connection_errors(anonymous)  # the broker hangs up on a client that says no SASL
    wrong = {**kafka_config(secure.settings, "regen"), "sasl.password": "not-the-password"}
    assert KafkaError._AUTHENTICATION in _connection_errors(wrong)
    # The right password works.
    assert not _connection_errors(kafka_config(secure.settings, "regen"))


def _connection_errors(config: dict[str, Any]) -> list[int]:
    """The error codes a client with ``config`` gets while asking for the cluster's metadata."""
    errors: list[KafkaError] = []
    admin = AdminClient({**config, "error_cb": errors.append, "log_level": 0})
    try:
        admin.list_topics(timeout=5)
    except KafkaException as exc:
        errors.append(exc.args[0])
    admin.poll(1)
    return [e.code() for e in errors]


def _produce_errors(config: dict[str, Any], topics: list[str]) -> dict[str, KafkaError | None]:
    """Send one record to each topic with a plain (non-idempotent) producer; each delivery's
    error, or None where it was written."""
    producer = Producer({**config, "enable.idempotence": False, "message.timeout.ms": 10_000})
    errors: dict[str, KafkaError | None] = {}
    for topic in topics:
        producer.produce(
            topic, b"v", key=b"k", on_delivery=lambda err, _m, t=topic: errors.setdefault(t, err)
        )
    assert producer.flush(30) == 0
    return errors


def test_the_stream_worker_cannot_write_recommendations(secure: Secure) -> None:
    s = secure.settings
    errors = _produce_errors(
        kafka_config(s, "streams"), [s.topic_recommendations, s.topic_profiles_changed]
    )
    refused = errors[s.topic_recommendations]
    assert refused is not None and refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED
    assert errors[s.topic_profiles_changed] is None  # its own output


def test_the_api_cannot_write_any_topic(secure: Secure) -> None:
    s = secure.settings
    errors = _produce_errors(kafka_config(s, "api"), s.topics())
    assert {t: e.code() if e else None for t, e in errors.items()} == {
        t: KafkaError.TOPIC_AUTHORIZATION_FAILED for t in s.topics()
    }


def test_producers_write_the_clickstream_but_cannot_read_it(secure: Secure) -> None:
    s = secure.settings
    config = kafka_config(s, "producer")
    assert _produce_errors(config, [s.topic_clickstream]) == {s.topic_clickstream: None}
    # Manual assignment from offset 0: the topic's READ right is what the fetch needs (the group,
    # which librdkafka insists on naming, is refused too and may say so first).
    consumer = Consumer({**config, "group.id": "producer-probe", "enable.auto.commit": False})
    codes: list[int] = []
    try:
        consumer.assign([TopicPartition(s.topic_clickstream, 0, 0)])
        deadline = time.monotonic() + 30
        while KafkaError.TOPIC_AUTHORIZATION_FAILED not in codes and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            assert error is not None, "a producer read the clickstream"
            codes.append(error.code())
    finally:
        consumer.close()
    assert KafkaError.TOPIC_AUTHORIZATION_FAILED in codes, codes


def test_applying_the_rights_again_keeps_them_and_drops_what_the_table_no_names(
    secure: Secure,
) -> None:
    from confluent_kafka.admin import (
        AclBindingFilter,
        AclOperation,
        AclPermissionType,
        ResourcePatternType,
        ResourceType,
    )

    from ops.access import apply_kafka

    s = secure.settings
    admin = AdminClient(kafka_config(s, "admin"))
    everything = AclBindingFilter(
        ResourceType.ANY, None, ResourcePatternType.ANY, None, None,  # type: ignore[arg-type]
        AclOperation.ANY, AclPermissionType.ANY,
    )  # fmt: skip

    def acls() -> set[tuple[str, str, str]]:
        found = admin.describe_acls(everything).result(timeout=30)
        return {(b.principal, b.name, b.operation.name) for b in found}

    before = acls()
    assert ("User:producer", s.topic_clickstream, "WRITE") in before
    apply_kafka(s)
    assert acls() == before
    renamed = s.model_copy(update={"topic_clickstream": "clicks-v2"})
    try:
        apply_kafka(renamed)
        after = acls()
        assert ("User:producer", "clicks-v2", "WRITE") in after
        assert not {acl for acl in after if acl[1] == s.topic_clickstream}
    finally:
        apply_kafka(s)
    assert acls() == before


# -- Redis refusals ------------------------------------------------------------------------------


def test_redis_refuses_the_default_user_and_wrong_passwords(secure: Secure) -> None:
    url = secure.settings.redis_url.get_secret_value()
    anonymous = redis.Redis.from_url(url)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    wrong = redis.Redis.from_url(url, username="api", password="not-the-password")
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    wrong.close()


def test_redis_users_are_limited_to_their_keys_and_commands(secure: Secure) -> None:
    s = secure.settings
    keys = Keys(s.key_prefix)
    admin = redis_client(s, "admin")
    admin.hset(keys.profile("victim"), mapping={"version": 1})
    admin.set(keys.recs("victim"), b"{}")
    api, streams = redis_client(s, "api"), redis_client(s, "streams")
    try:
        assert api.get(keys.recs("victim")) == b"{}"
        with pytest.raises(redis.exceptions.NoPermissionError):
            api.hgetall(keys.profile("victim"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            api.set(keys.recs("victim"), b"forged")
        with pytest.raises(redis.exceptions.NoPermissionError):
            streams.set(keys.recs("victim"), b"forged")
        with pytest.raises(redis.exceptions.NoPermissionError):
            streams.flushall()
        # ...while each writes what it owns.
        streams.hset(keys.profile("victim"), "version", 2)
        assert admin.get(keys.recs("victim")) == b"{}"
    finally:
        for client in (admin, api, streams):
            client.close()


def test_a_conversation_reads_the_profile_and_writes_only_the_session(secure: Secure) -> None:
    s = secure.settings
    keys = Keys(s.key_prefix)
    session = session_key(keys, "victim")
    admin = redis_client(s, "admin")
    admin.hset(keys.profile("victim"), mapping={"version": 1})
    admin.set(keys.recs("victim"), b"{}")
    converse, api, regen = (redis_client(s, p) for p in ("converse", "api", "regen"))
    try:
        assert converse.hgetall(keys.profile("victim")) == {b"version": b"1"}
        converse.set(session, b"{}", ex=60)
        assert regen.get(session) == b"{}"  # its constraints steer the regenerated list
        admin.hset(keys.item("victim-film"), "genres", "Drama")  # constraints are attributes
        assert regen.hget(keys.item("victim-film"), "genres") == b"Drama"
        admin.hset(keys.trending(20_000), "victim-film", 7)  # short histories' turns blend it
        assert converse.hgetall(keys.trending(20_000)) == {b"victim-film": b"7"}
        for forged in (
            lambda: converse.hincrby(keys.trending(20_000), "victim-film", 1000),
            lambda: converse.set(keys.recs("victim"), b"forged"),
            lambda: converse.hset(keys.profile("victim"), "version", 9),
            converse.flushall,
            lambda: regen.set(session, b"forged"),
            lambda: api.get(session),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forged()
        assert admin.get(keys.recs("victim")) == b"{}"
    finally:
        for client in (admin, converse, api, regen):
            client.close()


def test_the_regeneration_service_writes_only_the_returning_users_schedule(secure: Secure) -> None:
    from consumers.returning import ReturningUsers

    s = secure.settings
    keys = Keys(s.key_prefix)
    admin, regen = redis_client(s, "admin"), redis_client(s, "regen")
    try:
        admin.hset(keys.profile("victim"), mapping={"version": 1})
        schedule = ReturningUsers(regen, keys, idle_s=3600, below=4)
        assert schedule.schedule([("victim", 1000.0)]) == 1
        assert schedule.claim(clock=5000.0, limit=10) == [("victim", 4600.0)]  # the script runs
        assert schedule.drop(["victim"]) == 1
        for forged in (
            lambda: regen.hset(keys.profile("victim"), "version", 9),
            lambda: regen.zadd(keys.seen("victim"), {"e": 1.0}),
            lambda: regen.delete(keys.returning()),
            regen.flushall,
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forged()
        assert admin.hget(keys.profile("victim"), "version") == b"1"
    finally:
        for client in (admin, regen):
            client.close()


# -- the pipeline, end to end ---------------------------------------------------------------------


def test_the_pipeline_runs_end_to_end_with_one_principal_per_service(
    secure: Secure, tmp_path: Path, tiny_artifact: Path
) -> None:
    s = secure.settings
    api, api_metrics, regen, cache = free_port(), free_port(), free_port(), free_port()
    env = settings_env(s)
    env.update(
        {
            f"{ENV_PREFIX}SECRETS_DIR": str(secure.stack.secrets),  # each finds its own
            f"{ENV_PREFIX}STREAMS_DATADIR": str(tmp_path / "faust"),
            f"{ENV_PREFIX}STREAMS_METRICS_PORT": "0",
            f"{ENV_PREFIX}STREAMS_WEB_PORT": "0",
            f"{ENV_PREFIX}API_PORT": str(api),
            f"{ENV_PREFIX}API_METRICS_PORT": str(api_metrics),
            f"{ENV_PREFIX}REGEN_METRICS_PORT": str(regen),
            f"{ENV_PREFIX}CACHE_METRICS_PORT": str(cache),
            f"{ENV_PREFIX}REGEN_MODEL_DIR": str(tiny_artifact),
        }
    )
    run = Child.spawn("run", [sys.executable, "-m", "cli", "run"], tmp_path / "run.log", env)
    try:
        for port in (api, regen, cache):
            run.wait_healthy(http_ok(f"http://127.0.0.1:{port}/healthz"), timeout_s=120)
        # Opening views of a few ML-100K users, produced as the clickstream producer.
        dataset = load_dataset("ml-100k", s.data_dir)
        records = [
            (key, value)
            for key, value in replay_records(dataset, 400)
            if orjson.loads(value)["type"] == "view"
        ]
        users = {key.decode() for key, _ in records}
        assert produce(s, s.topic_clickstream, iter(records)) == len(records)

        def served() -> bool:
            return all(_recommendations(api, user) is not None for user in users)

        run.wait_healthy(served, timeout_s=120)
    finally:
        run.stop(60)
    log = (tmp_path / "run.log").read_text(errors="replace")
    assert "AUTHORIZATION_FAILED" not in log and "NOPERM" not in log
    for principal in PRINCIPALS:
        assert secure.secret("kafka", principal) not in log
        assert secure.secret("redis", principal) not in log


def _recommendations(port: int, user: str) -> dict[str, Any] | None:
    """The API's list for ``user`` when it came from the model (the cache), else None."""
    url = f"http://127.0.0.1:{port}/v1/users/{user}/recommendations"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body: dict[str, Any] = json.loads(response.read())
    except OSError:
        return None
    return body if body.get("source") == "model" else None
