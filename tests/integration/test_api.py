"""The read API on the real Redis: cached lists, the popular fallback, keys and scopes, bad input.

Every body is checked against the OpenAPI document the API serves, with an independent validator.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from api.keys import add_key, new_key, revoke_key
from api.settings import ApiSettings
from inference.popularity import Popularity
from lab.datasets import Dataset, Interaction, load_dataset
from ops.catalog import load_catalog
from recstream.keys import Keys
from recstream.security import redis_client
from schemas import ModelRef, Recommendations, ScoredItem
from schemas.api import Scope
from schemas.openapi import RECOMMENDATIONS_PATH
from tests.api_contract import assert_conforms, exchange
from tests.conftest import Namespace

pytestmark = pytest.mark.integration


def _stored(user: str) -> Recommendations:
    now = datetime.now(UTC)
    return Recommendations(
        user_id=user,
        items=[ScoredItem(item_id=f"i{n}", score=10.0 - n) for n in range(10)],
        profile_version=4,
        model=ModelRef(name="cooc", version="1"),
        variant="default",
        source="model",
        generated_at=now,
        trigger_ts=now,
    )


async def _calls(settings: ApiSettings, requests: list[tuple[str, dict[str, str]]]) -> list[Any]:
    return await exchange(settings, [("GET", path, headers, None) for path, headers in requests])


def test_read_api_serves_cache_fallback_and_rejects_bad_input(
    ns: Namespace, tmp_path: Path
) -> None:
    import orjson

    key, record = new_key([Scope.READ], "frontend")
    add_key(tmp_path / "keys", record)
    settings = ApiSettings(**ns.settings.model_dump(), api_keys_file=tmp_path / "keys")
    keys = Keys(settings.key_prefix)
    dataset = load_dataset("ml-100k", settings.data_dir)
    client = redis_client(settings)
    load_catalog(client, keys, dataset)
    stored = _stored("42")
    client.set(keys.recs("42"), stored.model_dump_json())
    client.close()
    auth = {"X-API-Key": key}
    requests = [
        ("/v1/users/42/recommendations", auth),
        ("/v1/users/42/recommendations?k=3", auth),
        ("/v1/users/nobody/recommendations?k=100", auth),
        ("/v1/users/42/recommendations", {}),
        ("/v1/users/42/recommendations", {"X-API-Key": "wrong"}),
        ("/v1/users/" + "x" * 65 + "/recommendations", auth),
        ("/v1/users/a%01b/recommendations", auth),
        ("/v1/users/42/recommendations?k=0", auth),
        ("/v1/users/42/recommendations?k=%C2%B2", auth),
        ("/v1/users/42/recommendations?k=" + "7" * 5000, auth),
        ("/healthz", {}),
        ("/metrics", auth),  # on its own port, never this one
        ("/openapi.json", {}),
        ("/v1/nothing-here", auth),
    ]
    results = asyncio.run(_calls(settings, requests))
    status = [r[0] for r in results]
    assert status == [200, 200, 200, 401, 401, 400, 400, 400, 400, 400, 200, 404, 200, 404]
    document = orjson.loads(results[12][2])
    assert document["openapi"] == "3.1.0"
    for (path, _), (code, _, body) in zip(requests, results, strict=True):
        route = RECOMMENDATIONS_PATH if path.startswith("/v1/users/") else path.split("?")[0]
        if route in document["paths"]:
            assert_conforms(document, route, code, body)

    assert Recommendations.model_validate_json(results[0][2]) == stored
    assert [i.item_id for i in Recommendations.model_validate_json(results[1][2]).items] == [
        "i0",
        "i1",
        "i2",
    ]
    fallback = Recommendations.model_validate_json(results[2][2])
    assert (fallback.source, fallback.user_id, fallback.model.name) == ("fallback", "nobody", "pop")
    # The one popularity model, over the dataset the catalog came from (ML-100K's top 100
    # holds ties, so this also pins the order among equally popular items).
    expected = Popularity.from_interactions([it.item_id for it in dataset.interactions])
    assert [(i.item_id, i.score) for i in fallback.items] == expected.recommend([[]], 100)[0]
    for _, content_type, body in results[3:10] + results[13:]:
        assert content_type.startswith("application/json")
        assert set(orjson.loads(body)["error"]) == {"code", "message"}
    assert orjson.loads(results[3][2])["error"]["code"] == "unauthorized"
    assert orjson.loads(results[5][2])["error"]["code"] == "bad_user_id"
    assert [orjson.loads(r[2])["error"]["code"] for r in results[7:10]] == ["bad_k"] * 3
    assert orjson.loads(results[10][2]) == {"ok": True}


def test_scopes_on_the_real_store(ns: Namespace, tmp_path: Path) -> None:
    """A read key gets the cached list; a key without read, no key, a wrong secret, an unknown
    id, a revoked or an expired key never reach it."""
    path = tmp_path / "keys"
    made = {}
    for name, scopes, expires in [
        ("reader", [Scope.READ], None),
        ("admin", [Scope.ADMIN, Scope.EVENTS], None),
        ("gone", [Scope.READ], None),
        ("old", [Scope.READ], datetime.now(UTC) - timedelta(seconds=1)),
    ]:
        key, record = new_key(scopes, name, expires_at=expires)
        add_key(path, record)
        made[name] = (key, record)
    revoke_key(path, made["gone"][1].key_id)
    settings = ApiSettings(**ns.settings.model_dump(), api_keys_file=path)
    client = redis_client(settings)
    stored = _stored("u-scoped")
    client.set(Keys(settings.key_prefix).recs("u-scoped"), stored.model_dump_json())
    client.close()
    reader = made["reader"][0]
    read = "/v1/users/u-scoped/recommendations"
    results = asyncio.run(
        _calls(
            settings,
            [
                (read, {"X-API-Key": reader}),
                (read, {"X-API-Key": made["admin"][0]}),
                (read, {}),
                (read, {"X-API-Key": reader[:-4] + "AAAA"}),
                (read, {"X-API-Key": "rs_000000000000_" + reader.split("_", 2)[2]}),
                (read, {"X-API-Key": made["gone"][0]}),
                (read, {"X-API-Key": made["old"][0]}),
            ],
        )
    )
    assert [r[0] for r in results] == [200, 403, 401, 401, 401, 401, 401]
    assert Recommendations.model_validate_json(results[0][2]) == stored
    assert len({r[2] for r in results[2:]}) == 1, "one 401 body for every refused key"
    for _, _, body in results[1:]:
        assert b"u-scoped" not in body and b"i0" not in body


def test_without_a_catalog_the_fallback_is_empty_and_no_key_is_needed(ns: Namespace) -> None:
    settings = ApiSettings(**ns.settings.model_dump())
    ((status, _, body),) = asyncio.run(_calls(settings, [("/v1/users/7/recommendations", {})]))
    assert status == 200
    fallback = Recommendations.model_validate_json(body)
    assert (fallback.source, fallback.items) == ("fallback", [])


def test_a_catalog_reload_replaces_the_popularity(ns: Namespace) -> None:
    settings = ApiSettings(**ns.settings.model_dump())
    keys = Keys(settings.key_prefix)
    client = redis_client(settings)

    def load(items: list[str]) -> None:
        interactions = [Interaction("u", item, float(n)) for n, item in enumerate(items)]
        load_catalog(client, keys, Dataset("t", interactions, {}, {}))

    try:
        load(["a", "b", "b", "c", "c", "c"])
        load(["z", "y", "y"])
    finally:
        client.close()
    ((_, _, body),) = asyncio.run(_calls(settings, [("/v1/users/7/recommendations", {})]))
    items = Recommendations.model_validate_json(body).items
    assert [(i.item_id, i.score) for i in items] == [("y", 1.0), ("z", 0.5)]
