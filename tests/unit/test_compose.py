"""The compose deployment is secure whatever the operator sets: SASL/SCRAM and ACLs on Kafka
(the same broker settings as `recstream stack up --secure`), Redis ACL users, each container with
only its own principal's secrets, no default password, nothing published beyond loopback."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.stack import Stack, StackSettings
from recstream.security import PRINCIPALS, ensure_secrets
from recstream.settings import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
KAFKA_START = REPO_ROOT / "deploy" / "kafka" / "secure-start.sh"

# Which principal's secrets each recstream container holds (and nothing else).
OWN = {
    "streams": {"kafka/streams", "redis/streams"},
    "regen": {"kafka/regen", "redis/regen"},
    "cache-writer": {"kafka/cache", "redis/cache"},
    "api": {"redis/api", "redis/converse", "kafka/converse"},
    "catalog": {"redis/admin"},
    "trainer": set(),
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _mounted(service: dict[str, Any]) -> set[str]:
    prefix = "/run/secrets/recstream/"
    return {
        s["target"].removeprefix(prefix)
        for s in service.get("secrets", [])
        if isinstance(s, dict) and s["target"].startswith(prefix)
    }


def test_each_container_mounts_only_its_own_principals_secrets(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, own in OWN.items():
        assert _mounted(services[name]) == own, name
        assert services[name]["environment"]["RECSTREAM_SECRETS_DIR"] == "/run/secrets/recstream"
    every = {f"kafka/{p}" for p in PRINCIPALS}
    assert _mounted(services["kafka-access"]) == every
    assert _mounted(services["kafka"]) == {"kafka/admin"}
    assert _mounted(services["redis-users"]) == {f"redis/{p}" for p in PRINCIPALS} - {
        "redis/producer"
    }


def test_secrets_have_no_default_and_nothing_is_published_beyond_loopback(
    compose: dict[str, Any],
) -> None:
    for name, secret in compose["secrets"].items():
        if name != "api-keys":
            assert secret["file"].startswith("${RECSTREAM_SECRETS_DIR:?"), name
    text = COMPOSE.read_text()
    assert not re.search(r"PASSWORD[A-Z_]*:\s*\$\{[A-Z_]+:-", text)  # no default password
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_grafana_has_no_anonymous_viewers_and_a_generated_admin_password(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    grafana = compose["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana-admin"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    assert grafana["secrets"] == ["grafana-admin"]
    secret = compose["secrets"]["grafana-admin"]["file"]
    assert secret.endswith("/grafana/admin")
    ensure_secrets(tmp_path / "s")  # what `recstream access secrets` writes
    assert len((tmp_path / "s" / "grafana" / "admin").read_text()) >= 32


def test_kafka_runs_the_secure_stack_s_broker_settings(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["entrypoint"][-1] == "/opt/recstream/secure-start.sh"
    assert "./deploy/kafka/secure-start.sh:/opt/recstream/secure-start.sh:ro" in kafka["volumes"]
    script = KAFKA_START.read_text()
    body = script.split('server.properties" <<EOF\n', 1)[1].split("\nEOF", 1)[0]
    props = dict(line.split("=", 1) for line in body.splitlines())
    (tmp_path / "secrets" / "kafka").mkdir(parents=True)
    (tmp_path / "secrets" / "kafka" / "admin").write_text("PW")
    stack = Stack(StackSettings(stack_dir=tmp_path, stack_secure=True))
    expected = stack._secure_properties("kafka", 9092, 9093)
    for key, value in expected.items():
        if key in ("listeners",):  # compose listens on every interface of its network
            assert props[key] == "SASL_PLAINTEXT://:9092,CONTROLLER://:9093"
            continue
        assert props[key] == value.replace('"PW"', '"$password"'), key
    assert "PLAINTEXT://" not in props["listeners"].replace("SASL_PLAINTEXT://", "")
    assert "--add-scram" in script


def test_redis_starts_from_the_acl_file_with_an_authenticated_health_check(
    compose: dict[str, Any],
) -> None:
    redis = compose["services"]["redis"]
    assert "--aclfile /data/users.acl" in redis["command"][0]
    assert compose["services"]["redis-users"]["command"] == [
        "access",
        "redis-acl",
        "/acl/users.acl",
    ]
    assert "--user admin" in redis["healthcheck"]["test"][1]
    for name in ("streams", "regen", "cache-writer"):
        assert "kafka-access" in compose["services"][name]["depends_on"]
