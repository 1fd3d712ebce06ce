"""Fixtures shared by all tests.

Integration tests run against the real Kafka and Redis that `recstream stack up` starts. When either
is missing the tests fail with a message saying so: never a silent skip. Each test gets its own
topics, consumer groups and Redis key prefix, so tests cannot see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recstream.settings import ENV_PREFIX, CommonSettings


def settings_env(settings: CommonSettings) -> dict[str, str]:
    """The process environment with ``settings`` as ``RECSTREAM_*`` variables, for child services.

    Any ``RECSTREAM_*`` variable of the test process itself is dropped, so children see only the
    test's own topics, prefix and addresses.
    """
    # The session's artifact verify key (see artifact_keys) is kept: children serve artifacts.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(ENV_PREFIX) or k.startswith(f"{ENV_PREFIX}ARTIFACT_VERIFY_")
    }
    env.update(
        {
            f"{ENV_PREFIX}KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
            f"{ENV_PREFIX}REDIS_URL": settings.redis_url.get_secret_value(),
            f"{ENV_PREFIX}KEY_PREFIX": settings.key_prefix,
            f"{ENV_PREFIX}TOPIC_CLICKSTREAM": settings.topic_clickstream,
            f"{ENV_PREFIX}TOPIC_DLQ": settings.topic_dlq,
            f"{ENV_PREFIX}TOPIC_PROFILES_CHANGED": settings.topic_profiles_changed,
            f"{ENV_PREFIX}TOPIC_RECOMMENDATIONS": settings.topic_recommendations,
            f"{ENV_PREFIX}TOPIC_PROFILES_CHANGED_DLQ": settings.topic_profiles_changed_dlq,
            f"{ENV_PREFIX}TOPIC_RECOMMENDATIONS_DLQ": settings.topic_recommendations_dlq,
            f"{ENV_PREFIX}TOPIC_PROFILE_EMBEDDINGS": settings.topic_profile_embeddings,
            f"{ENV_PREFIX}TOPIC_USERS_ERASED": settings.topic_users_erased,
            f"{ENV_PREFIX}TOPIC_PARTITIONS": str(settings.topic_partitions),
        }
    )
    return env


@pytest.fixture(scope="session", autouse=True)
def artifact_keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A key pair for the session: artifacts the tests train are signed, and verified, with it.

    Services refuse unsigned artifacts, so every test that trains then serves one needs a key;
    the environment carries it the way an operator's would (RECSTREAM_ARTIFACT_*).
    """
    from inference.integrity import generate_keypair

    key, pub = generate_keypair(tmp_path_factory.mktemp("artifact-keys"))
    with pytest.MonkeyPatch.context() as mp:
        for name in ("SIGNING_KEY", "VERIFY_KEY", "ALLOW_UNSIGNED"):
            mp.delenv(f"{ENV_PREFIX}ARTIFACT_{name}", raising=False)
        mp.setenv(f"{ENV_PREFIX}ARTIFACT_SIGNING_KEY_FILE", str(key))
        mp.setenv(f"{ENV_PREFIX}ARTIFACT_VERIFY_KEY_FILE", str(pub))
        yield pub


@dataclass(frozen=True)
class Namespace:
    """Unique names for one test: topics, a group id and a Redis key prefix."""

    token: str
    settings: CommonSettings

    def group(self, name: str = "g") -> str:
        return f"test-{self.token}-{name}"


@pytest.fixture(scope="session")
def stack_ready() -> CommonSettings:
    """The configured Kafka and Redis, verified to answer; fails loudly when they do not."""
    from cli.stack import Stack

    stack = Stack()
    missing = [
        name
        for name, ok in (("kafka", stack.kafka_ready()), ("redis", stack.redis_ready()))
        if not ok
    ]
    if missing:
        pytest.fail(
            f"integration tests need the real stack, but {', '.join(missing)} did not answer: "
            "run `recstream stack up` first",
            pytrace=False,
        )
    return stack.settings


@pytest.fixture
def ns(stack_ready: CommonSettings, request: pytest.FixtureRequest) -> Iterator[Namespace]:
    """Fresh topics (same partition count as the stack's) and a Redis prefix for one test."""
    import redis

    from cli.stack import Stack

    token = uuid.uuid4().hex[:10]
    partitions = getattr(request, "param", stack_ready.topic_partitions)
    settings = stack_ready.model_copy(
        update={
            "key_prefix": f"test:{token}:",
            "topic_clickstream": f"clickstream-{token}",
            "topic_dlq": f"clickstream.dlq-{token}",
            "topic_profiles_changed": f"profiles.changed-{token}",
            "topic_recommendations": f"recommendations-{token}",
            "topic_profiles_changed_dlq": f"profiles.changed.dlq-{token}",
            "topic_recommendations_dlq": f"recommendations.dlq-{token}",
            "topic_profile_embeddings": f"profiles.embeddings-{token}",
            "topic_users_erased": f"users.erased-{token}",
            "topic_partitions": partitions,
        }
    )
    Stack().create_topics(settings.topics(), partitions)
    yield Namespace(token=token, settings=settings)
    Stack().delete_topics(settings.topics())
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    try:
        keys = list(client.scan_iter(match=f"{settings.key_prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()
