"""The read API's aiohttp application.

- ``GET /v1/users/{user_id}/recommendations[?k=N]``: the user's cached list from Redis
  ``recs:{user}`` (the contract of DESIGN.md, as the cache writer stored it); when there is none,
  the most popular items of the loaded catalog with ``source: "fallback"`` (an empty list when no
  catalog is loaded), ranked by the one popularity model from the counts ``catalog load`` stored.
- ``GET /healthz``: Redis answers. ``GET /metrics``: Prometheus text. ``GET /openapi.json``.

When the ``api_key`` setting is set, ``/v1`` requests must carry it in ``X-API-Key`` (401
otherwise); health, metrics and the description stay open for probes. Bad input gets a 4xx with
an :class:`~schemas.api.ErrorResponse` body, never a 500.

Every body is a model of ``schemas/`` serialised by pydantic, and ``/openapi.json`` is generated
from the same models (:mod:`schemas.openapi`). A cached list is passed through as stored: the
cache writer validated it, and validating it again on every read would spend the latency this
API exists for.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import redis.asyncio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import to_json

from api.metrics import FALLBACKS, LATENCY, REQUESTS
from api.settings import ApiSettings
from inference.popularity import Popularity
from recstream.keys import Keys
from schemas import ErrorResponse, Health, ModelRef, Recommendations, ScoredItem
from schemas.events import Id
from schemas.openapi import RECOMMENDATIONS_PATH, openapi_document

__all__ = ["build_app", "served_openapi", "valid_user_id"]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REDIS: web.AppKey[redis.asyncio.Redis] = web.AppKey("redis", redis.asyncio.Redis)

_POPULARITY = ModelRef(name=Popularity.name, version=Popularity.version)
_USER_ID: TypeAdapter[str] = TypeAdapter(Id)
# ASCII digits, and few of them: str.isdigit() also accepts "²", which int() rejects, and int()
# refuses strings past 4,300 digits; both used to surface as a 500.
_K = re.compile(r"[0-9]{1,9}")


def valid_user_id(user_id: str) -> bool:
    """The event contract's identifier rule: 1-64 characters, no C0/C1 control characters."""
    try:
        _USER_ID.validate_python(user_id)
    except ValidationError:
        return False
    return True


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(status=status, body=to_json(model), content_type="application/json")


def _error(status: int, code: str, message: str) -> web.Response:
    return _json(ErrorResponse.of(code, message), status)


def served_openapi(settings: ApiSettings) -> dict[str, Any]:
    """The OpenAPI document this deployment serves: the contract with its own limits filled in."""
    return openapi_document(
        max_k=settings.api_max_k,
        default_k=settings.api_default_k,
        api_key=settings.api_key is not None,
        server=f"http://{settings.api_host}:{settings.api_port}",
    )


async def _popular(store: redis.asyncio.Redis, keys: Keys, k: int) -> list[tuple[str, float]]:
    """The ``k`` most popular items of the loaded catalog, scored by the one popularity model.

    ``catalog load`` stores minus each item's count, so Redis's ascending order (ties by id) is
    already the model's ranking and the first ``k`` entries are its top ``k``.
    """
    reply = await store.zrange(keys.popular(), 0, k - 1, withscores=True)
    top = cast(list[tuple[bytes, float]], reply)  # redis-py types every reply as one union
    model = Popularity({item.decode(): -round(negated) for item, negated in top})
    return model.recommend([[]], k)[0]


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def build_app(settings: ApiSettings) -> web.Application:
    """The application; it connects to Redis on startup."""
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
            code = re.sub(r"[^a-z0-9]+", "_", exc.reason.lower()).strip("_")
            return _error(exc.status, code or f"http_{exc.status}", exc.reason[:256])

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await dispatch(request, handler)
        except redis.RedisError as exc:  # an outage, not a bug: no traceback per request
            log.warning("request %s: Redis failed: %s", request.path, exc)
            response = _error(503, "unavailable", "the recommendation store does not answer")
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
            if not _K.fullmatch(k_text) or not 1 <= int(k_text) <= settings.api_max_k:
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
        now = datetime.now(UTC)
        fallback = Recommendations(
            user_id=user_id,
            items=[
                ScoredItem(item_id=item, score=score)
                for item, score in await _popular(request.app[REDIS], keys, k)
            ],
            profile_version=0,
            model=_POPULARITY,
            variant=settings.api_variant,
            source="fallback",
            generated_at=now,
            trigger_ts=now,
        )
        return _json(fallback)

    async def healthz(request: web.Request) -> web.Response:
        try:
            ok = bool(await request.app[REDIS].ping())
        except redis.RedisError:
            ok = False
        return _json(Health(ok=ok, redis=ok), 200 if ok else 503)

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    document = orjson.dumps(served_openapi(settings))

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    async def connect(app: web.Application) -> None:
        app[REDIS] = redis.asyncio.Redis.from_url(settings.redis_url.get_secret_value())

    async def disconnect(app: web.Application) -> None:
        await app[REDIS].aclose()

    app = web.Application(middlewares=[guard])
    app.router.add_get(RECOMMENDATIONS_PATH, recommendations)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.on_startup.append(connect)
    app.on_cleanup.append(disconnect)
    return app


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
