"""A trained artifact served end to end: the cached list is the artifact's own answer.

Real clickstream events go through the real streams worker (a subprocess), the profile changes
through the regeneration service with a worker pool serving the tiny artifact trained for this
session, and the published lists through the cache writer into Redis. Each ``recs:{user}`` must
hold what ``load_recommender`` answers for the history the service derives from the stored
profile (and, for an artifact that blends recent popularity, the counts the stream worker kept):
a drift anywhere on the way (vocabulary, batching, quantization, a silent fallback, the counts
handed to the workers) shows up as a different list.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumers.cache_writer import CacheWriter
from consumers.regen import RegenService, build_pool
from consumers.regenerate import model_history
from consumers.settings import CacheWriterSettings, RegenSettings
from inference.artifact import ArtifactRecommender, load_recommender, read_catalog
from recstream.keys import Keys
from recstream.security import redis_client
from schemas import PopularNow, ProfileChanged, ProfileChanges, Recommendations
from streams.profile import read_profile
from streams.trending import DAY_S, day_of
from tests.conftest import Namespace
from tests.integration.streams_support import (
    Worker,
    counts,
    event,
    produce,
    produce_events,
    trend_counts,
    users_per_item,
    wait_for,
)

pytestmark = pytest.mark.integration


class _Served:
    """The running services and what a test reads back."""

    def __init__(self, ns: Namespace, settings: RegenSettings) -> None:
        self.ns, self.settings = ns, settings
        self.client = redis_client(ns.settings)
        self.keys = Keys(ns.settings.key_prefix)

    def cached(self, user: str) -> Recommendations | None:
        raw = self.client.get(self.keys.recs(user))
        return None if raw is None else Recommendations.model_validate_json(raw)

    def settled(self, users: list[str]) -> bool:
        for user in users:
            profile, recs = read_profile(self.client, self.keys, user), self.cached(user)
            if profile is None or recs is None or recs.profile_version != profile.version:
                return False
        return True

    def fold(self, histories: dict[str, list[str]], start: float) -> None:
        """Each user views their history's items a second apart from ``start``; returns once
        every list is cached for the newest profile."""
        produced = [
            event(f"{user}-{n}", user, item, start + n)
            for user, history in histories.items()
            for n, item in enumerate(history)
        ]
        produce_events(self.ns.settings, produced)
        folded = {user: len(history) for user, history in histories.items()}
        wait_for(lambda: counts(self.ns.settings, histories) == folded, "the streams worker's fold")
        wait_for(lambda: self.settled(list(histories)), "each user's newest list in the cache", 90)

    def assert_served(self, model: ArtifactRecommender, user: str) -> list[str]:
        """The user's cached list is ``model``'s answer for the stored profile; returns it."""
        profile, recs = read_profile(self.client, self.keys, user), self.cached(user)
        assert profile is not None and recs is not None
        expected = model.recommend([model_history(profile)], self.settings.regen_k)[0]
        assert recs.source == "model", f"{user} got the pool's fallback"
        assert (recs.model.name, recs.model.version) == (model.name, model.version)
        assert [i.item_id for i in recs.items] == [item for item, _ in expected]
        assert [i.score for i in recs.items] == pytest.approx([s for _, s in expected], rel=1e-5)
        return [i.item_id for i in recs.items]


@contextlib.contextmanager
def _serving(ns: Namespace, tmp_path: Path, artifact: Path, **regen: Any) -> Iterator[_Served]:
    common = ns.settings.model_dump()
    settings = RegenSettings(
        **common,
        regen_group_id=ns.group("regen"),
        regen_model_dir=artifact,
        regen_pool={"workers": 1, "max_batch_size": 8, "request_timeout_s": 30.0},
        **regen,
    )
    pool = build_pool(settings).start()
    service = RegenService(settings, pool)
    writer = CacheWriter(CacheWriterSettings(**common, cache_group_id=ns.group("cache")))
    threads = [threading.Thread(target=svc.run, daemon=True) for svc in (service, writer)]
    for thread in threads:
        thread.start()
    worker = Worker(ns.settings, ns.group("streams"), tmp_path).start()
    served = _Served(ns, settings)
    try:
        yield served
    finally:
        worker.stop()
        service.stop()
        writer.stop()
        for thread in threads:
            thread.join(30)
        pool.close()
        served.client.close()


def test_cached_lists_are_the_artifacts_answer_for_the_folded_history(
    ns: Namespace, tmp_path: Path, tiny_artifact: Path
) -> None:
    items = read_catalog(tiny_artifact).item_ids
    # Histories of different lengths, so the pool batches unlike rows together; the last user
    # views only an item the model does not know and gets its popularity list.
    histories = {"u-short": items[:2], "u-long": items[10:40], "u-mid": items[50:57]}
    histories["u-unknown"] = ["not-in-the-artifact"]
    with _serving(ns, tmp_path, tiny_artifact) as served:
        served.fold(histories, time.time() - 600)
        model = load_recommender(tiny_artifact)
        for user in histories:
            served.assert_served(model, user)


def _turns(settings: RegenSettings, user: str, n: int, when: float) -> None:
    """``n`` conversation-turn notices of ``user`` stamped ``when``: changes with no new item."""
    changes = (
        ProfileChanged(
            user_id=user,
            profile_version=1,
            changes=ProfileChanges(new_items=[], events=1),
            event_id=f"turn-{user}-{k}",
            trigger_ts=datetime.fromtimestamp(when, UTC),
        )
        for k in range(n)
    )
    records = ((user.encode(), c.model_dump_json().encode()) for c in changes)
    produce(settings, records, settings.topic_profiles_changed)


def test_a_new_user_gets_what_is_popular_now_and_a_longer_history_does_not(
    ns: Namespace, tmp_path: Path, trending_artifact: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = load_recommender(trending_artifact)
    assert model.trending.active and model.trending.below == 4
    items = model.item_ids
    # The item the crowd takes up today: one the model ranks low for the newcomer's history.
    newcomer = [items[0]]
    hot = model.recommend([newcomer], len(items))[0][-1][0]
    crowd = {f"crowd-{n}": [hot, items[20 + n]] for n in range(6)}
    now = time.time() - 600
    with _serving(ns, tmp_path, trending_artifact, regen_trending_refresh_s=0.2) as served:
        served.fold(crowd, now)
        crowd_counts = trend_counts(ns.settings, now)
        assert crowd_counts == users_per_item(
            {"user_id": u, "item_id": i} for u, h in crowd.items() for i in h
        )
        time.sleep(0.5)  # past a refresh: the service holds every crowd count
        # Turns stamped tomorrow (a replay's stale ones, say) outnumber the newcomer's change:
        # they bring no item, so the window stays on the day the items are counted.
        caplog.set_level(logging.INFO, logger="consumers.regen")
        _turns(served.settings, "talker", 20, now + DAY_S)
        served.fold({"newcomer": newcomer}, now + 60)
        moves = [r.getMessage() for r in caplog.records if "recent popularity" in r.getMessage()]
        assert not any(m.endswith(f"day {day_of(now + DAY_S)}") for m in moves), moves
        # The list was made with the crowd's counts, with or without the newcomer's own item
        # (counted right after the fold that announced the change): one of the two answers.
        answers = []
        helds = (crowd_counts, trend_counts(ns.settings, now))
        for held in helds:
            model.use_recent(held)
            answers.append(model.recommend([newcomer], served.settings.regen_k)[0])
        recs = served.cached("newcomer")
        assert recs is not None and recs.source == "model"
        listed = [(i.item_id, pytest.approx(i.score, rel=1e-5)) for i in recs.items]
        assert listed in answers
        model.use_recent(helds[answers.index(listed)])  # the counts the list was made with
        assert listed[0][0] == hot, "the crowd's item heads a one-item history's list"
        # It says so: six users took it up in the model's window; an item the model put there
        # does not.
        assert recs.items[0].popular == PopularNow(users=6, days=model.trending.days)
        assert {i.item_id for i in recs.items if i.popular} == set(
            model.popular(newcomer, [i.item_id for i in recs.items])
        )
        plain = load_recommender(trending_artifact)  # no counts given: the model alone
        assert hot not in [i for i, _ in plain.recommend([newcomer], 10)[0]]
        served.fold({"veteran": items[40:46]}, now + 120)
        served.assert_served(plain, "veteran")  # six items: no blend, whatever the counts
        veteran = served.cached("veteran")
        assert veteran is not None and not any(i.popular for i in veteran.items)


def test_a_returning_newcomers_list_is_made_again_with_what_is_popular_then(
    ns: Namespace, tmp_path: Path, returning_artifact: Path
) -> None:
    """A blend for returning users only: the list made as the newcomer's event is folded is the
    model's alone; once the service's clock (the newest event time it has seen) is an hour past
    that event, the list is made again with the crowd's counts, under the same profile version,
    and the user is due again a day later. A longer history is never scheduled."""
    model = load_recommender(returning_artifact)
    assert model.refreshes and model.trending.idle_s == 3600 and model.trending.below == 4
    items = model.item_ids
    newcomer = [items[0]]
    hot = model.recommend([newcomer], len(items))[0][-1][0]
    crowd = {f"crowd-{n}": [hot, items[20 + n]] for n in range(6)}
    start = (day_of(time.time()) - 3) * DAY_S + 3_600.0  # one UTC day holds every event here
    keys = Keys(ns.settings.key_prefix)
    with _serving(
        ns, tmp_path, returning_artifact, regen_trending_refresh_s=0.2, regen_returning_poll_s=0.2
    ) as served:
        served.fold(crowd, start)
        time.sleep(0.5)  # past a refresh: the service holds every crowd count
        served.fold({"newcomer": newcomer}, start + 60)
        plain = load_recommender(returning_artifact)  # no counts: the model alone
        first = served.assert_served(plain, "newcomer")
        assert hot not in first
        assert served.client.zscore(keys.returning(), "newcomer") == start + 60 + 3_600
        served.fold({"veteran": items[40:46]}, start + 120)
        assert served.client.zscore(keys.returning(), "veteran") is None  # six items
        before = served.cached("newcomer")
        assert before is not None

        # Another user's event two hours on moves the clock past the newcomer's hour.
        served.fold({"passer-by": [items[30]]}, start + 7_200)

        def remade() -> bool:
            recs = served.cached("newcomer")
            return recs is not None and recs.items[0].item_id == hot

        wait_for(remade, "the newcomer's list made again", 60)
        recs = served.cached("newcomer")
        assert recs is not None and recs.source == "model"
        assert recs.profile_version == before.profile_version
        assert recs.items[0].popular == PopularNow(users=6, days=model.trending.days)
        # Made with the day's counts, with or without the passer-by's item (counted as its
        # change was announced, and read within the refresh): one of the two answers.
        day = trend_counts(ns.settings, start)
        answers = []
        for held in (day, {i: n for i, n in day.items() if i != items[30]}):
            model.use_recent(held)
            again = model.recommend([newcomer], served.settings.regen_k, returning=[True])[0]
            answers.append([item for item, _ in again])
        assert [i.item_id for i in recs.items] in answers
        wait_for(
            lambda: (
                served.client.zscore(keys.returning(), "newcomer") == start + 60 + 3_600 + DAY_S
            ),
            "the newcomer due again a day later",
        )
        veteran = served.cached("veteran")
        assert veteran is not None and not any(i.popular for i in veteran.items)
