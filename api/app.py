"""The read API's aiohttp application.

- ``GET /v1/users/{user_id}/recommendations[?k=N]``: the user's cached list from Redis
  ``recs:{user}`` (the contract of DESIGN.md, as the cache writer stored it); when there is none,
  the most popular items with ``source: "fallback"``.
- ``GET /healthz``: Redis answers. ``GET /metrics``: Prometheus text. ``GET /openapi.json``.

When the ``api_key`` setting is set, ``/v1`` requests must carry it in ``X-API-Key`` (401
otherwise); health, metrics and the description stay open for probes. Bad input gets a 4xx with a
JSON body ``{"error": {"code": ..., "message": ...}}``.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import orjson
import redis.asyncio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter, ValidationError

from api.metrics import FALLBACKS, LATENCY, REQUESTS
from api.openapi import openapi_document
from api.settings import ApiSettings
from recstream.keys import Keys
from schemas.events import Id

__all__ = ["build_app", "valid_user_id"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REDIS: web.AppKey[redis.asyncio.Redis] = web.AppKey("redis", redis.asyncio.Redis)
POPULAR: web.AppKey[list[tuple[str, float]]] = web.AppKey("popular", list)


_USER_ID: TypeAdapter[str] = TypeAdapter(Id)


def valid_user_id(user_id: str) -> bool:
    """The event contract's identifier rule: 1-64 characters, no C0/C1 control characters."""
    try:
        _USER_ID.validate_python(user_id)
    except ValidationError:
        return False
    return True


def _error(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return web.Response(status=status, body=body, content_type="application/json")


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def build_app(
    settings: ApiSettings, popular: list[tuple[str, float]] | None = None
) -> web.Application:
    """The application; ``popular`` (item, score) overrides loading it from the dataset."""
    keys = Keys(settings.key_prefix)
    api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None

    async def dispatch(request: web.Request, handler: Handler) -> web.StreamResponse:
        if api_key is not None and request.path.startswith("/v1/"):
            given = request.headers.get("X-API-Key", "").encode()
            if not hmac.compare_digest(given, api_key):
                return _error(401, "unauthorized", "missing or wrong X-API-Key header")
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405, as JSON like every error
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await dispatch(request, handler)
        except Exception:  # one request failed; the service answers 500 and goes on
            log.exception("request %s failed", request.path)
            response = _error(500, "internal", "internal error")
        REQUESTS.labels(_route_name(request), str(response.status)).inc()
        LATENCY.labels(_route_name(request)).observe(time.perf_counter() - started)
        return response

    async def recommendations(request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        if not valid_user_id(user_id):
            return _error(400, "bad_user_id", "user_id must be 1-64 characters, no control chars")
        k_text = request.query.get("k")
        k = settings.api_default_k
        if k_text is not None:
            if not k_text.isdigit() or not 1 <= int(k_text) <= settings.api_max_k:
                return _error(400, "bad_k", f"k must be an integer from 1 to {settings.api_max_k}")
            k = int(k_text)
        raw = await request.app[REDIS].get(keys.recs(user_id))
        if raw is not None:
            if k_text is None:  # the stored JSON is the contract: pass it through untouched
                return web.Response(body=raw, content_type="application/json")
            document = orjson.loads(raw)
            document["items"] = document["items"][:k]
            return web.Response(body=orjson.dumps(document), content_type="application/json")
        FALLBACKS.inc()
        now = datetime.now(UTC).isoformat()
        document = {
            "schema_version": 1,
            "user_id": user_id,
            "items": [{"item_id": i, "score": s} for i, s in request.app[POPULAR][:k]],
            "profile_version": 0,
            "model": {"name": "pop", "version": "1"},
            "variant": settings.api_variant,
            "source": "fallback",
            "generated_at": now,
            "trigger_ts": now,
        }
        return web.Response(body=orjson.dumps(document), content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        try:
            ok = bool(await request.app[REDIS].ping())
        except redis.RedisError:
            ok = False
        return web.Response(
            status=200 if ok else 503,
            body=orjson.dumps({"ok": ok, "redis": ok}),
            content_type="application/json",
        )

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    document = orjson.dumps(openapi_document(settings))

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    async def connect(app: web.Application) -> None:
        app[REDIS] = redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value())
        app[POPULAR] = popular if popular is not None else _load_popular(settings)

    async def disconnect(app: web.Application) -> None:
        await app[REDIS].aclose()

    app = web.Application(middlewares=[guard])
    app.router.add_get("/v1/users/{user_id}/recommendations", recommendations)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.on_startup.append(connect)
    app.on_cleanup.append(disconnect)
    return app


def _load_popular(settings: ApiSettings) -> list[tuple[str, float]]:
    from inference.worker import PopularityRecommender
    from lab.datasets import load_dataset

    ds = load_dataset(settings.dataset, settings.data_dir)
    pop = PopularityRecommender.from_interactions([it.item_id for it in ds.interactions])
    return pop.recommend([[]], settings.api_max_k)[0]


def run(settings: ApiSettings) -> None:
    """Serve until SIGINT/SIGTERM (aiohttp stops accepting, finishes requests, cleans up)."""
    import uvloop

    log.info("read API on http://%s:%d", settings.api_host, settings.api_port)
    web.run_app(
        build_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        access_log=None,  # one log line per read would cost more than the read
        print=None,
        loop=uvloop.new_event_loop(),  # a faster loop: lower tail latency per request
    )
