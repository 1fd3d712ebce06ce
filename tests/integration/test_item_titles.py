"""The titles that published reasons carry: read from the catalog in Redis once, kept, expired,
and never a reason to hold a list back."""

from __future__ import annotations

import redis
from prometheus_client import REGISTRY

from consumers import ItemTitles
from recstream.keys import Keys
from recstream.security import redis_client
from tests.conftest import Namespace


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_titles_are_read_once_then_kept_until_they_expire(ns: Namespace) -> None:
    keys = Keys(ns.settings.key_prefix)
    client = redis_client(ns.settings)
    clock = _Clock()
    try:
        client.hset(keys.item("1"), mapping={"title": "Toy Story (1995)", "categories": "Comedy"})
        client.hset(keys.item("2"), mapping={"title": b"\xff\xfe broken " + b"x" * 600})
        titles = ItemTitles(client, keys, max_age_s=60.0, clock=clock)
        first = titles.titles(["1", "2", "404", "1"])
        assert first["1"] == "Toy Story (1995)"
        assert first["2"].startswith("\ufffd\ufffd broken ") and len(first["2"]) == 512
        assert first["404"] == ""  # not in the catalog
        # Kept: a changed title does not show until the entry expires.
        client.hset(keys.item("1"), "title", "Toy Story (renamed)")
        assert titles.titles(["1"]) == {"1": "Toy Story (1995)"}
        clock.now = 61.0
        assert titles.titles(["1"]) == {"1": "Toy Story (renamed)"}
    finally:
        client.delete(keys.item("1"), keys.item("2"))
        client.close()


def test_least_recently_used_titles_go_beyond_capacity(ns: Namespace) -> None:
    keys = Keys(ns.settings.key_prefix)
    client = redis_client(ns.settings)
    try:
        for n in range(3):
            client.hset(keys.item(str(n)), "title", f"t{n}")
        titles = ItemTitles(client, keys, capacity=2)
        titles.titles(["0", "1"])
        titles.titles(["0"])  # 0 is used again: 1 is the least recent
        titles.titles(["2"])
        client.hset(keys.item("0"), "title", "new 0")
        client.hset(keys.item("1"), "title", "new 1")
        assert titles.titles(["0", "1"]) == {"0": "t0", "1": "new 1"}
    finally:
        client.delete(*(keys.item(str(n)) for n in range(3)))
        client.close()


def test_an_unreachable_redis_gives_empty_titles_and_is_counted(ns: Namespace) -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.2, socket_timeout=0.2)
    before = REGISTRY.get_sample_value("recs_regen_title_lookup_failures_total") or 0.0
    titles = ItemTitles(dead, Keys(ns.settings.key_prefix))
    assert titles.titles(["1", "2"]) == {"1": "", "2": ""}
    after = REGISTRY.get_sample_value("recs_regen_title_lookup_failures_total") or 0.0
    assert after - before == 1
