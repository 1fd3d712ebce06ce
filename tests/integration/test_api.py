"""The read API on the real Redis: cached lists, the popular fallback, keys and bad input."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from aiohttp import ClientSession, web
from pydantic import SecretStr

from api.app import build_app
from api.settings import ApiSettings
from recstream.keys import Keys
from schemas import ModelRef, Recommendations, ScoredItem
from tests.conftest import Namespace

pytestmark = pytest.mark.integration

POPULAR = [(f"p{n}", 1.0 - n / 100) for n in range(30)]
KEY = "k3y-for-tests"


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
    runner = web.AppRunner(build_app(settings, popular=POPULAR))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # bound server
    out = []
    try:
        async with ClientSession() as session:
            for path, headers in requests:
                async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as resp:
                    body = await resp.read()
                    out.append((resp.status, resp.headers.get("Content-Type", ""), body))
    finally:
        await runner.cleanup()
    return out


def test_read_api_serves_cache_fallback_and_rejects_bad_input(ns: Namespace) -> None:
    import orjson

    settings = ApiSettings(**ns.settings.model_dump(), api_key=SecretStr(KEY))
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    stored = _stored("42")
    client.set(Keys(settings.key_prefix).recs("42"), stored.model_dump_json())
    client.close()
    auth = {"X-API-Key": KEY}
    results = asyncio.run(
        _calls(
            settings,
            [
                ("/v1/users/42/recommendations", auth),
                ("/v1/users/42/recommendations?k=3", auth),
                ("/v1/users/nobody/recommendations?k=5", auth),
                ("/v1/users/42/recommendations", {}),
                ("/v1/users/42/recommendations", {"X-API-Key": "wrong"}),
                ("/v1/users/" + "x" * 65 + "/recommendations", auth),
                ("/v1/users/a%01b/recommendations", auth),
                ("/v1/users/42/recommendations?k=0", auth),
                ("/healthz", {}),
                ("/metrics", {}),
                ("/openapi.json", {}),
                ("/v1/nothing-here", auth),
            ],
        )
    )
    status = [r[0] for r in results]
    assert status == [200, 200, 200, 401, 401, 400, 400, 400, 200, 200, 200, 404]

    assert Recommendations.model_validate_json(results[0][2]) == stored
    assert [i.item_id for i in Recommendations.model_validate_json(results[1][2]).items] == [
        "i0",
        "i1",
        "i2",
    ]
    fallback = Recommendations.model_validate_json(results[2][2])
    assert fallback.source == "fallback"
    assert fallback.user_id == "nobody"
    assert [i.item_id for i in fallback.items] == ["p0", "p1", "p2", "p3", "p4"]
    for _, content_type, body in results[3:8] + results[11:]:
        assert content_type.startswith("application/json")
        assert set(orjson.loads(body)["error"]) == {"code", "message"}
    assert orjson.loads(results[3][2])["error"]["code"] == "unauthorized"
    assert orjson.loads(results[5][2])["error"]["code"] == "bad_user_id"
    assert orjson.loads(results[8][2]) == {"ok": True, "redis": True}
    assert b"recs_api_requests_total" in results[9][2]
    document = orjson.loads(results[10][2])
    assert document["openapi"].startswith("3.")
    assert "/v1/users/{user_id}/recommendations" in document["paths"]


def test_without_a_key_setting_no_key_is_needed(ns: Namespace) -> None:
    settings = ApiSettings(**ns.settings.model_dump())
    ((status, _, _),) = asyncio.run(_calls(settings, [("/v1/users/7/recommendations", {})]))
    assert status == 200
