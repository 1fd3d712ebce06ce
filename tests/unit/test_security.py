"""Client credentials per principal (recstream.security) and the rights table (ops.access)."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from api.settings import ApiSettings
from consumers.settings import CacheWriterSettings, RegenSettings
from ops.access import redis_acl_file, rights
from recstream.errors import ConfigError
from recstream.kafka import idempotent_producer
from recstream.security import (
    PRINCIPALS,
    credentials,
    ensure_secrets,
    kafka_config,
    redis_client,
)
from recstream.settings import CommonSettings
from streams.settings import StreamsSettings


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    folder = tmp_path / "secrets"
    ensure_secrets(folder)
    return folder


def test_without_credentials_clients_connect_as_before() -> None:
    settings = CommonSettings(kafka_bootstrap="k:1")
    assert kafka_config(settings) == {"bootstrap.servers": "k:1"}
    assert credentials(settings, "redis") is None


def test_each_service_reads_its_own_principal_from_the_secrets_dir(secrets: Path) -> None:
    for cls, principal in (
        (StreamsSettings, "streams"),
        (RegenSettings, "regen"),
        (CacheWriterSettings, "cache"),
        (ApiSettings, "api"),
        (CommonSettings, "admin"),
    ):
        settings = cls(secrets_dir=secrets)
        config = kafka_config(settings)
        assert config["sasl.username"] == principal
        assert config["sasl.password"] == (secrets / "kafka" / principal).read_text()
        assert config["security.protocol"] == "SASL_PLAINTEXT"
        assert config["sasl.mechanism"] == "SCRAM-SHA-512"
        found = credentials(settings, "redis")
        assert found is not None and found.username == principal
    # A tool that acts for another principal names it.
    assert kafka_config(CommonSettings(secrets_dir=secrets), "producer")["sasl.username"] == (
        "producer"
    )


def test_explicit_credentials_win_and_read_a_password_file(
    tmp_path: Path, secrets: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("from-a-file\n")
    monkeypatch.setenv("RECSTREAM_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("RECSTREAM_KAFKA_USERNAME", "svc-streams")
    monkeypatch.setenv("RECSTREAM_KAFKA_PASSWORD_FILE", str(password_file))
    monkeypatch.setenv("RECSTREAM_REDIS_USERNAME", "svc-streams")
    monkeypatch.setenv("RECSTREAM_REDIS_PASSWORD", "from-the-env")
    settings = StreamsSettings()
    assert kafka_config(settings)["sasl.username"] == "svc-streams"
    assert kafka_config(settings)["sasl.password"] == "from-a-file"
    found = credentials(settings, "redis")
    assert found is not None and found.password.get_secret_value() == "from-the-env"


def test_missing_or_incomplete_credentials_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no kafka secret for principal 'regen'"):
        kafka_config(RegenSettings(secrets_dir=tmp_path))
    with pytest.raises(ConfigError, match="RECSTREAM_REDIS_PASSWORD"):
        credentials(CommonSettings(redis_username="x"), "redis")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        credentials(CommonSettings(kafka_username="x", kafka_password_file=empty), "kafka")


def test_passwords_never_appear_in_repr_errors_or_logs(
    secrets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = StreamsSettings(
        secrets_dir=secrets,
        redis_url="redis://127.0.0.1:1/0",
        kafka_bootstrap="127.0.0.1:1",
        kafka_password="explicit-secret",
    )
    password = (secrets / "kafka" / "streams").read_text()
    found = credentials(settings, "kafka")
    client = redis_client(settings, socket_connect_timeout=0.2)
    # librdkafka's own log (connection attempts, SASL) through Python logging, to be searched.
    producer = idempotent_producer(
        settings, logger=logging.getLogger("librdkafka"), debug="security"
    )
    try:
        seen = " ".join(
            [repr(settings), str(settings.model_dump()), repr(found), str(found), repr(client)]
        )
        with pytest.raises(Exception) as refused:  # nothing listens on port 1
            client.ping()
        producer.poll(1.0)
        seen += str(refused.value)
    finally:
        client.close()
        producer.flush(0)
    seen += caplog.text
    assert "librdkafka" in caplog.text  # the client's log was captured
    assert password not in seen
    assert "explicit-secret" not in seen


def test_secrets_are_random_private_files_kept_across_calls(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    ensure_secrets(folder)
    first = {p.name: p.read_text() for p in (folder / "kafka").iterdir()}
    ensure_secrets(folder)
    assert {p.name: p.read_text() for p in (folder / "kafka").iterdir()} == first
    assert set(first) == set(PRINCIPALS)
    assert len(set(first.values())) == len(PRINCIPALS)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_rights_follow_the_least_privilege_rules() -> None:
    settings = CommonSettings(key_prefix="p:")
    table = {r.principal: r for r in rights(settings)}
    assert set(table) == set(PRINCIPALS)
    assert settings.topic_recommendations not in table["streams"].writes
    assert settings.topic_recommendations in table["regen"].writes
    assert table["api"].reads == table["api"].writes == table["api"].groups == ()
    assert table["producer"].writes == (settings.topic_clickstream,)
    assert table["producer"].reads == ()
    api = table["api"].redis.split()
    assert "%R~p:u:{*}:recs" in api and "%R~p:catalog:popular" in api
    assert not [rule for rule in api if rule.startswith("~")]  # reads only
    assert "+@write" not in api
    assert "~p:u:{*}:recs" not in table["streams"].redis.split()


def test_redis_acl_file_turns_the_default_user_off_and_stores_digests(
    tmp_path: Path, secrets: Path
) -> None:
    path = tmp_path / "users.acl"
    redis_acl_file(CommonSettings(secrets_dir=secrets), path)
    text = path.read_text()
    assert text.splitlines()[0].startswith("user default off")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for principal in PRINCIPALS:
        assert (secrets / "redis" / principal).read_text() not in text
    assert "user producer " not in text  # no Redis right, no Redis user
