"""`recstream replay regen | compare` against the real Kafka and Redis, on a known case."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from cli.main import main
from cli.stack import Stack
from inference.popularity import Popularity
from ops.regen import RegenReplay, changed_users, compare_topics, latest_lists
from ops.settings import OpsSettings
from recstream.kafka import idempotent_producer
from recstream.keys import Keys
from recstream.security import async_redis_client, redis_client
from recstream.settings import CommonSettings
from schemas import ModelRef, ProfileChanged, ProfileChanges, Recommendations, ScoredItem
from streams.fold import FoldParams, FoldScript
from streams.profile import read_profile
from streams.trending import day_of
from tests.conftest import Namespace
from tests.unit.pool_models import RecentEcho

pytestmark = pytest.mark.integration

T0 = 1_700_000_000.0
ITEMS = [f"i{n:02d}" for n in range(30)]
HISTORIES = {
    "u1": ["i00", "i05"],
    "u2": ["i01"],
    "u3": ["i02", "i03", "i04"],
    "early": ["i06"],
    "late": ["i07"],
}
MODEL = ModelRef(name="pop", version="replay-test")


@pytest.fixture
def out_topic(ns: Namespace) -> Iterator[str]:
    name = f"recommendations.replay-{ns.token}"
    Stack().create_topics([name], ns.settings.topic_partitions)
    yield name
    Stack().delete_topics([name])


def fold_histories(ns: Namespace) -> None:
    async def run() -> None:
        client = async_redis_client(ns.settings)
        try:
            script = FoldScript(client, ns.settings.key_prefix, FoldParams())
            await script.run(
                {
                    user: [(f"{user}-{n}", item, T0 + n, 1.0) for n, item in enumerate(items)]
                    for user, items in HISTORIES.items()
                }
            )
        finally:
            await client.aclose()

    asyncio.run(run())


def live_list(user: str, items: list[str], version: int) -> Recommendations:
    return Recommendations(
        user_id=user,
        items=[ScoredItem(item_id=i, score=1.0 / (r + 1)) for r, i in enumerate(items)],
        profile_version=version,
        model=ModelRef(name="live", version="1"),
        variant="default",
        source="model",
        generated_at=datetime.now(UTC),
        trigger_ts=datetime.fromtimestamp(T0, UTC),
    )


def produce_at(
    settings: CommonSettings, topic: str, rows: list[tuple[str, bytes, datetime]]
) -> None:
    producer = idempotent_producer(settings)
    for key, value, when in rows:
        producer.produce(
            topic, key=key.encode(), value=value, timestamp=int(when.timestamp() * 1e3)
        )
    assert producer.flush(30) == 0


def cli_env(ns: Namespace) -> dict[str, str]:
    """The replay command's environment: this test's broker, Redis prefix and topics."""
    return {
        "RECSTREAM_KAFKA_BOOTSTRAP": ns.settings.kafka_bootstrap,
        "RECSTREAM_REDIS_URL": ns.settings.redis_url.get_secret_value(),
        "RECSTREAM_KEY_PREFIX": ns.settings.key_prefix,
        "RECSTREAM_TOPIC_PROFILES_CHANGED": ns.settings.topic_profiles_changed,
        "RECSTREAM_TOPIC_RECOMMENDATIONS": ns.settings.topic_recommendations,
    }


def test_regen_replay_over_a_time_range_and_its_comparison(ns: Namespace, out_topic: str) -> None:
    settings = OpsSettings(**ns.settings.model_dump(), replay_regen_batch_size=2)
    fold_histories(ns)
    client = redis_client(ns.settings)
    stored = {u: read_profile(client, Keys(ns.settings.key_prefix), u) for u in HISTORIES}
    client.close()

    # Changes: three users inside [since, until), one before, one after; u1 changed twice.
    now = datetime.now(UTC)
    since, until = now - timedelta(hours=1), now - timedelta(minutes=5)
    inside = now - timedelta(minutes=30)

    def change(user: str, version: int) -> bytes:
        return (
            ProfileChanged(
                user_id=user,
                profile_version=version,
                changes=ProfileChanges(new_items=[HISTORIES[user][-1]], events=1),
                event_id=f"{user}-e{version}",
                trigger_ts=datetime.fromtimestamp(T0 + version, UTC),
            )
            .model_dump_json()
            .encode()
        )

    produce_at(
        ns.settings,
        ns.settings.topic_profiles_changed,
        [
            ("early", change("early", 1), since - timedelta(minutes=10)),
            ("u1", change("u1", 1), inside),
            ("u2", change("u2", 1), inside),
            ("u1", change("u1", 2), inside + timedelta(seconds=1)),
            ("u3", change("u3", 1), inside),
            ("late", change("late", 1), until + timedelta(minutes=1)),
        ],
    )
    changes = changed_users(settings, since, until)
    assert sorted(changes) == ["u1", "u2", "u3"]
    assert changes["u1"].profile_version == 2

    # The replayed model: popularity over 30 items, seen items excluded.
    recommender = Popularity({item: 100 - n for n, item in enumerate(ITEMS)})
    expected = {
        u: [i for i, _ in recommender.recommend([HISTORIES[u]], 10)[0]] for u in ("u1", "u2", "u3")
    }

    # The live lists: u1 the same, u2 reversed, u3 half replaced; u1 also has an older, very
    # different list that must not be the one compared; "early" is outside the range.
    others = [i for i in ITEMS if all(i not in lst for lst in expected.values())]
    live = [
        live_list("u1", others[:10], 0),
        live_list("u1", expected["u1"], 1),
        live_list("u2", expected["u2"][::-1], 1),
        live_list("u3", expected["u3"][:5] + others[:5], 1),
        live_list("early", others[:10], 1),
    ]
    produce_at(
        ns.settings,
        ns.settings.topic_recommendations,
        [(r.user_id, r.model_dump_json().encode(), now) for r in live],
    )

    stats = RegenReplay(settings, recommender, MODEL).run(changes, out_topic)
    assert (stats.users, stats.published, stats.missing_profiles) == (3, 3, 0)

    replayed = latest_lists(settings, out_topic)
    assert sorted(replayed) == ["u1", "u2", "u3"]
    for user, recs in replayed.items():
        profile = stored[user]
        assert profile is not None
        assert [i.item_id for i in recs.items] == expected[user]
        assert recs.profile_version == profile.version
        assert recs.model == MODEL
        assert recs.variant == settings.replay_variant
        assert recs.trigger_ts == changes[user].trigger_ts

    result = compare_topics(settings, ns.settings.topic_recommendations, out_topic, set(changes))
    assert (result.users, result.only_a, result.only_b) == (3, 0, 0)
    assert result.overlap_mean == pytest.approx((1 + 1 + 0.5) / 3)
    # u3 by hand: union of 15 items; 60 concordant, 25 discordant pairs, 10 ties in each
    # ranking: tau-b = 35 / sqrt(95 * 95).
    assert result.tau_mean == pytest.approx((1 - 1 + 35 / 95) / 3)
    assert (result.changed, result.membership_changed) == (2, 1)

    # The same comparison through the command line, over whole topics ("early" only live).
    env = {
        "RECSTREAM_KAFKA_BOOTSTRAP": ns.settings.kafka_bootstrap,
        "RECSTREAM_REDIS_URL": ns.settings.redis_url.get_secret_value(),
    }
    cli = CliRunner().invoke(
        main,
        ["replay", "compare", "--topic", ns.settings.topic_recommendations, "--topic", out_topic],
        env=env,
    )
    assert cli.exit_code == 0, cli.output
    assert f"users compared: 3 (only in {ns.settings.topic_recommendations}: 1," in cli.output
    assert f"overlap@10 (mean): {2.5 / 3:.4f}" in cli.output
    assert "top-10 changed: 2 (item set changed: 1)" in cli.output

    # A model that blends recent popularity gets the window ending on the latest change's day
    # (RecentEcho: 7 days; it lists the counted items, most counted first, unseen only).
    keys, client = Keys(ns.settings.key_prefix), redis_client(ns.settings)
    try:
        client.hset(keys.trending(day_of(T0)), mapping={"i10": 5, "i11": 9, "i00": 50})
        client.hset(keys.trending(day_of(T0) - 10), "i12", 100)  # outside the window
    finally:
        client.close()
    RegenReplay(settings, RecentEcho(), MODEL).run(changes, out_topic)
    replayed = latest_lists(settings, out_topic)
    assert [i.item_id for i in replayed["u1"].items] == ["i11", "i10"]  # i00 is u1's own
    assert [i.item_id for i in replayed["u2"].items] == ["i00", "i11", "i10"]


def test_regen_dry_run_lists_users_and_writes_nothing(ns: Namespace, out_topic: str) -> None:
    now = datetime.now(UTC)
    body = ProfileChanged(
        user_id="u1",
        profile_version=1,
        changes=ProfileChanges(new_items=["i00"], events=1),
        event_id="e1",
        trigger_ts=now,
    ).model_dump_json()
    produce_at(
        ns.settings,
        ns.settings.topic_profiles_changed,
        [("u1", body.encode(), now - timedelta(minutes=2))],
    )
    env = cli_env(ns)
    result = CliRunner().invoke(
        main,
        [
            "replay",
            "regen",
            "--from-time",
            (now - timedelta(hours=1)).isoformat(),
            "--to-time",
            now.isoformat(),
            "--out-topic",
            out_topic,
            "--dry-run",
            "--no-progress",
        ],
        env=env,
    )
    assert result.exit_code == 0, result.output
    assert "1 users changed" in result.output
    assert "nothing was written" in result.output
    settings = OpsSettings(**ns.settings.model_dump())
    assert latest_lists(settings, out_topic) == {}


def test_regen_command_with_the_live_default_model(ns: Namespace, out_topic: str) -> None:
    """The command end to end: ML-100K co-occurrence model, real catalog ids, printed comparison."""
    histories = {"1": ["50", "172", "133"], "2": ["258", "269"]}

    async def fold() -> None:
        client = async_redis_client(ns.settings)
        try:
            await FoldScript(client, ns.settings.key_prefix, FoldParams()).run(
                {
                    u: [(f"{u}-{n}", item, T0 + n, 1.0) for n, item in enumerate(items)]
                    for u, items in histories.items()
                }
            )
        finally:
            await client.aclose()

    asyncio.run(fold())
    now = datetime.now(UTC)
    produce_at(
        ns.settings,
        ns.settings.topic_profiles_changed,
        [
            (
                user,
                ProfileChanged(
                    user_id=user,
                    profile_version=1,
                    changes=ProfileChanges(new_items=items[-1:], events=len(items)),
                    event_id=f"{user}-e",
                    trigger_ts=now,
                )
                .model_dump_json()
                .encode(),
                now - timedelta(minutes=1),
            )
            for user, items in histories.items()
        ],
    )
    env = cli_env(ns)
    args = ["replay", "regen", "--from-time", (now - timedelta(minutes=5)).isoformat()]
    args += ["--to-time", now.isoformat(), "--out-topic", out_topic, "--no-progress"]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    assert "2 users changed" in result.output
    assert f"published 2 lists to '{out_topic}'" in result.output
    assert f"only in {out_topic}: 2" in result.output  # nothing live to compare with yet

    from lab.datasets import load_dataset

    catalog = load_dataset("ml-100k", OpsSettings().data_dir).items
    lists = latest_lists(OpsSettings(**ns.settings.model_dump()), out_topic)
    for user, recs in lists.items():
        ids = [i.item_id for i in recs.items]
        assert len(ids) == 10
        assert set(ids) <= set(catalog), "a replayed list holds items outside the catalog"
        assert not set(ids) & set(histories[user]), "seen items must not be recommended"
        assert recs.model.name == "cooc"
