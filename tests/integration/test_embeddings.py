"""The embeddings publisher on the real Kafka and Redis: a change notice in, a noised vector out.

The item vectors come from a tiny trained artifact with its MiniLM item index (the session's
``tiny_artifact`` has none, so this module writes one the same way with the index added).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client import REGISTRY
from scipy import stats

from consumers.embeddings import EmbeddingsService, ItemVectors
from consumers.settings import EmbeddingsSettings
from inference.privacy import GaussianMechanism, PrivacyLedger, rho_to_epsilon
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.security import async_redis_client, kafka_config, redis_client
from recstream.settings import CommonSettings
from schemas import ProfileChanged, ProfileChanges
from schemas.embeddings import ProfileEmbedding
from streams.fold import FoldParams, FoldScript
from streams.profile import read_profile
from tests.conftest import Namespace
from tests.integration.conftest import train_tiny_artifact

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def indexed_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_artifact``'s recipe plus the MiniLM item index."""
    return train_tiny_artifact(tmp_path_factory.mktemp("indexed-artifact") / "gen", with_index=True)


@pytest.fixture(scope="module")
def vectors(indexed_artifact: Path) -> ItemVectors:
    return ItemVectors.from_artifact(indexed_artifact)


@pytest.fixture
def make_service(ns: Namespace, vectors: ItemVectors) -> Iterator[Callable[..., EmbeddingsService]]:
    started: list[tuple[EmbeddingsService, threading.Thread]] = []

    def make(**overrides: object) -> EmbeddingsService:
        settings = EmbeddingsSettings(
            **ns.settings.model_dump(),
            embeddings_group_id=ns.group("embeddings"),
            embeddings_metrics_port=0,
            **overrides,
        )
        service = EmbeddingsService(settings, vectors)
        thread = threading.Thread(target=service.run, name="embeddings", daemon=True)
        thread.start()
        started.append((service, thread))
        return service

    yield make
    for service, thread in started:
        service.stop()
        thread.join(30)
        assert not thread.is_alive()


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)  # polling interval of the wait, not a fixed delay


def _notices(outcome: str) -> float:
    return REGISTRY.get_sample_value("recs_embeddings_notices_total", {"outcome": outcome}) or 0.0


def _fold(
    settings: CommonSettings, user: str, items: list[str], start: datetime, first: int = 0
) -> list[int]:
    """Fold one click per item into Redis, as the stream worker does; the versions reached."""

    async def run() -> list[int]:
        client = async_redis_client(settings)
        script = FoldScript(client, settings.key_prefix, FoldParams())
        out = []
        try:
            for n, item in enumerate(items):
                ts = (start + timedelta(seconds=n)).timestamp()
                event = (f"e-{user}-{first + n}", item, ts, 2.0)
                (result,) = await script.run({user: [event]})
                out.append(result.version)
        finally:
            await client.aclose()
        return out

    return asyncio.run(run())


def _notify(settings: CommonSettings, user: str, version: int, raw: bytes | None = None) -> None:
    change = ProfileChanged(
        user_id=user,
        profile_version=version,
        changes=ProfileChanges(events=1),
        event_id=f"e-{user}-{version}",
        trigger_ts=datetime(2026, 1, 1, tzinfo=UTC),
    )
    producer = idempotent_producer(settings)
    value = change.model_dump_json().encode() if raw is None else raw
    producer.produce(settings.topic_profiles_changed, key=user.encode(), value=value)
    assert producer.flush(10) == 0


def _watermarks(consumer: Consumer, tp: TopicPartition) -> tuple[int, int]:
    """The partition's offsets; a topic created moments ago may not have a leader yet."""
    deadline = time.monotonic() + 30
    while True:
        try:
            low, high = consumer.get_watermark_offsets(tp, 10)
            return int(low), int(high)
        except KafkaException:
            assert time.monotonic() < deadline, f"no watermarks for {tp.topic}/{tp.partition}"
            time.sleep(0.1)  # polling interval while the new topic's leader is elected


def _releases(settings: CommonSettings) -> list[ProfileEmbedding]:
    """Everything on the embeddings topic (read to the high watermarks)."""
    consumer = Consumer({**kafka_config(settings), "group.id": "unused"})
    out: list[ProfileEmbedding] = []
    try:
        for partition in range(settings.topic_partitions):
            tp = TopicPartition(settings.topic_profile_embeddings, partition)
            low, high = _watermarks(consumer, tp)
            if high <= low:
                continue
            consumer.assign([TopicPartition(tp.topic, partition, low)])
            for _ in range(high - low):
                message = consumer.poll(10)
                assert message is not None and message.error() is None
                release = ProfileEmbedding.model_validate_json(message.value() or b"")
                assert message.key() == release.user_id.encode()
                out.append(release)
    finally:
        consumer.close()
    return out


def test_a_change_notice_becomes_one_noised_vector_and_its_budget_is_recorded(
    ns: Namespace, make_service: Callable[..., EmbeddingsService], vectors: ItemVectors
) -> None:
    settings = ns.settings
    make_service()
    user = "dp:user"
    items = list(vectors.rows)[:6]
    version = _fold(settings, user, items, datetime(2026, 1, 1, tzinfo=UTC))[-1]
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    profile = read_profile(client, keys, user)
    assert profile is not None and profile.version == version
    clean = vectors.embed(profile)
    assert clean is not None

    published, skipped = _notices("published"), _notices("skipped")
    _notify(settings, "nobody", 1)  # no stored profile: skipped
    _notify(settings, user, 1, raw=b"{not json")  # unreadable: skipped
    _notify(settings, user, version)
    _wait_for(lambda: _notices("published") == published + 1, 30, "the release")
    assert _notices("skipped") == skipped + 2

    (release,) = _releases(settings)
    mech = GaussianMechanism()  # the defaults: ε = 1, δ = 1e-5, C = 1
    assert (release.user_id, release.profile_version) == (user, version)
    assert (release.epsilon, release.delta, release.sigma) == (1.0, 1e-5, mech.sigma)
    assert release.mechanism == "analytic-gaussian/zcdp"
    noise = np.asarray(release.vector) - clean  # clean is unit length: clipping left it alone
    # |noise|² / σ² ~ chi2(384): the published vector carries exactly the calibrated noise.
    statistic = float(noise @ noise) / mech.sigma**2
    assert stats.chi2.sf(statistic, 384) > 1e-6 and stats.chi2.cdf(statistic, 384) > 1e-6

    ledger = PrivacyLedger(client, keys, budget_rho=1.0, window_s=0.0)
    assert ledger.spent_rho(user) == pytest.approx(mech.rho)
    assert ledger.spent_rho("nobody") == 0.0
    # Delivered and confirmed: the ledger keeps no copy of the vector.
    assert not client.hexists(keys.privacy_ledger(user), "pending")

    # The same version again (a replay, a duplicate notice): nothing more is published or spent.
    duplicates = _notices("duplicate")
    _notify(settings, user, version)
    _wait_for(lambda: _notices("duplicate") == duplicates + 1, 30, "the duplicate notice")
    assert len(_releases(settings)) == 1
    assert ledger.spent_rho(user) == pytest.approx(mech.rho)
    client.close()


def test_a_user_past_the_budget_gets_no_release(
    ns: Namespace, make_service: Callable[..., EmbeddingsService], vectors: ItemVectors
) -> None:
    settings = ns.settings
    rho = GaussianMechanism().rho
    # Room for two releases at ε = 1, not three.
    service = make_service(embeddings_budget_epsilon=rho_to_epsilon(2.5 * rho, 1e-5))
    user = "budget-user"
    items = list(vectors.rows)[10:13]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    over = _notices("over_budget")
    for n, item in enumerate(items):
        (version,) = _fold(settings, user, [item], start + timedelta(minutes=n), first=n)
        before = _notices("published") + _notices("over_budget")
        _notify(settings, user, version)
        _wait_for(
            lambda b=before: _notices("published") + _notices("over_budget") == b + 1,
            30,
            f"the notice of version {version}",
        )
    assert [r.profile_version for r in _releases(settings)] == [1, 2]
    assert _notices("over_budget") == over + 1
    assert service.ledger.refused(user) == 1
    assert service.ledger.spent_rho(user) == pytest.approx(2 * rho)


def test_recstream_serve_embeddings_publishes_and_stops_cleanly(
    ns: Namespace, indexed_artifact: Path, vectors: ItemVectors, tmp_path: Path
) -> None:
    """The command the supervisor starts: health, one release, SIGTERM closes it (exit 0)."""
    import signal
    import sys

    from cli.supervise import Child, free_port, http_ok
    from tests.conftest import settings_env

    port = free_port()
    healthy = http_ok(f"http://127.0.0.1:{port}/healthz", timeout_s=2)

    env = {
        **settings_env(ns.settings),
        "RECSTREAM_EMBEDDINGS_MODEL_DIR": str(indexed_artifact),
        "RECSTREAM_EMBEDDINGS_GROUP_ID": ns.group("embeddings-cli"),
        "RECSTREAM_EMBEDDINGS_METRICS_PORT": str(port),
    }
    command = [sys.executable, "-m", "cli", "serve", "embeddings"]
    child = Child.spawn("embeddings", command, tmp_path / "embeddings.log", env)
    try:
        child.wait_healthy(healthy, timeout_s=60)
        user = "cli-user"
        (version,) = _fold(
            ns.settings, user, list(vectors.rows)[:1], datetime(2026, 1, 1, tzinfo=UTC)
        )
        _notify(ns.settings, user, version)
        _wait_for(lambda: len(_releases(ns.settings)) == 1, 30, "the release")
        child.signal(signal.SIGTERM)
        assert child.stop(30, signalled=True) == 0, child.log_tail()
    finally:
        child.stop(5)
    assert "embeddings publisher closed" in child.log_tail(100_000)


def test_a_release_granted_before_a_crash_is_published_again_unchanged_and_free(
    ns: Namespace, make_service: Callable[..., EmbeddingsService], vectors: ItemVectors
) -> None:
    # The ledger state a crash leaves between the spend and the delivery: the version granted,
    # its payload kept. The redelivered notice must publish those bytes, not fresh noise.
    settings = ns.settings
    user = "crashed-user"
    (version,) = _fold(settings, user, list(vectors.rows)[20:21], datetime(2026, 1, 1, tzinfo=UTC))
    mech = GaussianMechanism()
    kept = ProfileEmbedding(
        user_id=user,
        profile_version=version,
        vector=[0.5] * 384,
        epsilon=1.0,
        delta=1e-5,
        clip_norm=1.0,
        sigma=mech.sigma,
        mechanism="analytic-gaussian/zcdp",
        generated_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    client = redis_client(settings)
    keys = Keys(settings.key_prefix)
    ledger = PrivacyLedger(client, keys, budget_rho=1.0, window_s=0.0)
    ledger.spend(user, version, mech.rho, kept.model_dump_json().encode())
    make_service()
    _notify(settings, user, version)
    _wait_for(lambda: len(_releases(settings)) == 1, 60, "the republished release")
    assert _releases(settings) == [kept]
    assert ledger.spent_rho(user) == pytest.approx(mech.rho)  # not spent twice
    _wait_for(lambda: not client.hexists(keys.privacy_ledger(user), "pending"), 30, "confirm")
    client.close()
