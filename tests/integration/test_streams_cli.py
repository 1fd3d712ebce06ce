"""The data commands end to end: catalog load, replay-dataset, the worker, profile show."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import cast

import orjson
import pytest
from click.testing import CliRunner

from cli.main import main
from lab.datasets import load_dataset
from recstream.keys import Keys
from recstream.security import redis_client
from schemas import Profile
from tests.conftest import Namespace
from tests.integration.streams_support import Worker, counts, event, produce_events, wait_for

pytestmark = pytest.mark.integration

LIMIT = 600


@pytest.fixture
def env(ns: Namespace) -> dict[str, str]:
    s = ns.settings
    return {
        "RECSTREAM_KEY_PREFIX": s.key_prefix,
        "RECSTREAM_TOPIC_CLICKSTREAM": s.topic_clickstream,
        "RECSTREAM_TOPIC_DLQ": s.topic_dlq,
        "RECSTREAM_TOPIC_PROFILES_CHANGED": s.topic_profiles_changed,
        "RECSTREAM_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
        "RECSTREAM_REDIS_URL": s.redis_url.get_secret_value(),
    }


@pytest.fixture
def worker(ns: Namespace, tmp_path: Path) -> Iterator[Worker]:
    started = Worker(ns.settings, ns.group("streams"), tmp_path).start()
    yield started
    started.stop()


def run(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_catalog_replay_and_profile_show(
    ns: Namespace, env: dict[str, str], worker: Worker
) -> None:
    assert "loaded 1682 items of ml-100k" in run(env, "catalog", "load", "--dataset", "ml-100k")
    client = redis_client(ns.settings, decode_responses=True)
    keys = Keys(ns.settings.key_prefix)
    try:
        # decode_responses gives str; redis-py's annotations do not follow that flag.
        item = cast(dict[str, str], client.hgetall(keys.item("1")))
        meta = cast(dict[str, str], client.hgetall(keys.catalog_meta()))
        assert item["title"].startswith("Toy Story")
        assert item["categories"] == "Animation|Children|Comedy"
        assert item["year"] == "1995"
        assert client.scard(keys.catalog()) == 1682
        assert meta["dataset"] == "ml-100k"
        assert "u.data" in orjson.loads(meta["sha256"])
    finally:
        client.close()

    assert f"produced {LIMIT} events" in run(
        env, "replay-dataset", "--dataset", "ml-100k", "--limit", str(LIMIT)
    )
    data = load_dataset("ml-100k", ns.settings.data_dir)
    ratings = data.interactions[: LIMIT // 3]
    expected: dict[str, int] = {}
    for it in ratings:
        expected[it.user_id] = expected.get(it.user_id, 0) + 3
    wait_for(lambda: counts(ns.settings, expected) == expected, "replayed events folded")

    user = ratings[0].user_id
    shown = Profile.model_validate(orjson.loads(run(env, "profile", "show", user, "--json")))
    mine = [it for it in ratings if it.user_id == user]
    assert shown.event_count == 3 * len(mine)
    assert set(shown.item_weights) == {it.item_id for it in mine}
    text = run(env, "profile", "show", user)
    assert f"user {user}  version {shown.version}  events {shown.event_count}" in text
    assert shown.top_categories(1)[0] in text

    # A second replay carries the same event ids. Once a fresh event for the same user (same
    # key, so same partition, consumed after the replay) is folded, the replay has been seen:
    # the profile moved by that one event only.
    run(env, "replay-dataset", "--dataset", "ml-100k", "--limit", str(LIMIT), "--rate", "5000")
    last = mine[-1]
    produce_events(ns.settings, [event("fresh-1", user, last.item_id, last.ts, "view")])
    wait_for(lambda: counts(ns.settings, [user])[user] == shown.event_count + 1, "fresh event")
    again = Profile.model_validate(orjson.loads(run(env, "profile", "show", user, "--json")))
    assert again.version == shown.version + 1
    assert again.item_weights[last.item_id] == pytest.approx(shown.item_weights[last.item_id] + 1)


def test_profile_show_for_an_unknown_user_fails_cleanly(env: dict[str, str]) -> None:
    result = CliRunner().invoke(main, ["profile", "show", "nobody"], env=env)
    assert result.exit_code == 1
    assert "no profile for user 'nobody'" in result.output
