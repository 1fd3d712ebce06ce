"""A trained artifact served end to end: the cached list is the artifact's own answer.

Real clickstream events go through the real streams worker (a subprocess), the profile changes
through the regeneration service with a worker pool serving the tiny artifact trained for this
session, and the published lists through the cache writer into Redis. Each ``recs:{user}`` must
hold what ``load_recommender`` answers for the history the service derives from the stored
profile: a drift anywhere on the way (vocabulary, batching, quantization, a silent fallback)
shows up as a different list.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from consumers.cache_writer import CacheWriter
from consumers.regen import RegenService, build_pool
from consumers.regenerate import model_history
from consumers.settings import CacheWriterSettings, RegenSettings
from inference.artifact import load_recommender, read_catalog
from recstream.keys import Keys
from recstream.security import redis_client
from schemas import Recommendations
from streams.profile import read_profile
from tests.conftest import Namespace
from tests.integration.streams_support import Worker, counts, event, produce_events, wait_for

pytestmark = pytest.mark.integration


def test_cached_lists_are_the_artifacts_answer_for_the_folded_history(
    ns: Namespace, tmp_path: Path, tiny_artifact: Path
) -> None:
    common = ns.settings.model_dump()
    items = read_catalog(tiny_artifact).item_ids
    # Histories of different lengths, so the pool batches unlike rows together; the last user
    # views only an item the model does not know and gets its popularity list.
    histories = {"u-short": items[:2], "u-long": items[10:40], "u-mid": items[50:57]}
    histories["u-unknown"] = ["not-in-the-artifact"]
    start = time.time() - 600
    produced = [
        event(f"{user}-{n}", user, item, start + n)
        for user, history in histories.items()
        for n, item in enumerate(history)
    ]
    settings = RegenSettings(
        **common,
        regen_group_id=ns.group("regen"),
        regen_model_dir=tiny_artifact,
        regen_pool={"workers": 1, "max_batch_size": 8, "request_timeout_s": 30.0},
    )
    pool = build_pool(settings).start()
    regen = RegenService(settings, pool)
    writer = CacheWriter(CacheWriterSettings(**common, cache_group_id=ns.group("cache")))
    threads = [threading.Thread(target=svc.run, daemon=True) for svc in (regen, writer)]
    for thread in threads:
        thread.start()
    worker = Worker(ns.settings, ns.group("streams"), tmp_path).start()
    client = redis_client(ns.settings)
    keys = Keys(ns.settings.key_prefix)

    def cached(user: str) -> Recommendations | None:
        raw = client.get(keys.recs(user))
        return None if raw is None else Recommendations.model_validate_json(raw)

    def settled() -> bool:
        for user in histories:
            profile, recs = read_profile(client, keys, user), cached(user)
            if profile is None or recs is None or recs.profile_version != profile.version:
                return False
        return True

    try:
        produce_events(ns.settings, produced)
        folded = {user: len(history) for user, history in histories.items()}
        wait_for(lambda: counts(ns.settings, histories) == folded, "the streams worker's fold")
        wait_for(settled, "each user's newest list in the cache", 90)
        model = load_recommender(tiny_artifact)
        for user in histories:
            profile, recs = read_profile(client, keys, user), cached(user)
            assert profile is not None and recs is not None
            expected = model.recommend([model_history(profile)], settings.regen_k)[0]
            assert recs.source == "model", f"{user} got the pool's fallback"
            assert (recs.model.name, recs.model.version) == (model.name, model.version)
            assert [i.item_id for i in recs.items] == [item for item, _ in expected]
            assert [i.score for i in recs.items] == pytest.approx([s for _, s in expected])
    finally:
        worker.stop()
        regen.stop()
        writer.stop()
        for thread in threads:
            thread.join(30)
        pool.close()
        client.close()
