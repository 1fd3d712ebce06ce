"""The read API's aiohttp application.

- ``GET /v1/users/{user_id}/recommendations[?k=N]``: the user's cached list from Redis
  ``recs:{user}`` (the contract of DESIGN.md, as the cache writer stored it); when there is none,
  the most popular items of the loaded catalog with ``source: "fallback"`` (an empty list when no
  catalog is loaded), ranked by the one popularity model from the counts ``catalog load`` stored.
- ``DELETE /v1/users/{user_id}`` (admin scope): erase every stored key of the user and record the
  erasure (``streams.erasure``, as the ``eraser`` principal); 503 with the reason when this
  deployment has no eraser credentials or Kafka did not take the record (then nothing was
  deleted). ``GET /v1/users/{user_id}/export`` (admin scope): everything stored about the user.
- ``POST /v1/events`` (events scope): one clickstream event or ``{"events": [...]}``, checked
  exactly as the stream worker checks them (all or nothing: a 400 names each invalid event's
  index and reason code), produced to the clickstream topic as the ``producer`` principal and
  answered 202 ``{"accepted": n}`` once Kafka acknowledged them all (:mod:`api.ingest`); 413 for
  a body over ``api_max_body_bytes``; 503 when this deployment has no producer credentials or
  Kafka does not acknowledge in time (a retry with the same event ids folds once).
- ``POST /v1/users/{user_id}/conversation`` (converse scope): one refinement turn in words
  (:mod:`api.conversation`): the list under the session's constraints, each item with its
  reasons, and the session id; 404 for an expired session, 413 for a body over 8 KiB, 503 when
  this deployment serves no conversation (``api_conversation_model_dir`` unset).
- ``GET /healthz``: ``{"ok": …}``, nothing more. ``GET /openapi.json``.
- ``GET /metrics`` (Prometheus text) on a port of its own (``api_metrics_port``, loopback by
  default), never on the API's port.

Each route requires the scope :data:`schemas.openapi.SCOPES` names for it; building the app fails
for a route that is not listed there, so a new route cannot be open by omission. A request to a
scoped route must carry an API key (``X-API-Key``) that the keys file lists with that scope: no
key, or an unknown, wrong, revoked or expired one, is a 401 with one body for all; a valid key
without the scope is a 403. With no keys file (development) requests need no key and may use the
anonymous scopes (read) only; :func:`check_exposure` refuses that on a non-loopback address.
Bad input gets a 4xx with an :class:`~schemas.api.ErrorResponse` body, never a 500.

Logs never carry a user id, a key or its digest: a failure is logged with the route's pattern
and a request id, which the response returns in ``X-Request-Id``.

Every body is a model of ``schemas/`` serialised by pydantic, and ``/openapi.json`` is generated
from the same models (:mod:`schemas.openapi`). A cached list is passed through as stored: the
cache writer validated it, and validating it again on every read would spend the latency this
API exists for.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
import redis.asyncio
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic_core import to_json

from api.conversation import (
    MAX_CONVERSATION_BODY,
    ConversationEngine,
    RecentWindows,
    TurnRefused,
    load_attributes,
    parse_request,
    run_turn,
)
from api.exceptions import IngestFailed, UnsafeExposureError
from api.ingest import EventSink, Record, Refused, ingestion_refusal, parse_events
from api.keys import KeyRing
from api.metrics import EVENTS, FALLBACKS, LATENCY, NOTICES, REQUESTS
from api.settings import ApiSettings, is_loopback
from inference.popularity import Popularity
from recstream.errors import ConfigError
from recstream.keys import Keys
from recstream.security import async_redis_client, credentials
from schemas import (
    ErrorResponse,
    Health,
    ModelRef,
    ProfileChanged,
    ProfileChanges,
    Recommendations,
    ScoredItem,
)
from schemas.api import ApiKeyRecord, ErrorBody, EventsAccepted, EventsRejected, Scope
from schemas.conversation import ConversationReply
from schemas.events import Id
from schemas.openapi import (
    ANONYMOUS_SCOPES,
    CONVERSATION_PATH,
    EVENTS_PATH,
    EXPORT_PATH,
    RECOMMENDATIONS_PATH,
    SCOPES,
    USER_PATH,
    openapi_document,
)
from streams.erasure import ERASER, Eraser
from streams.exceptions import ErasureFailed

__all__ = [
    "PRINCIPAL",
    "build_app",
    "build_metrics_app",
    "check_exposure",
    "served_openapi",
    "valid_user_id",
]

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REDIS: web.AppKey[redis.asyncio.Redis] = web.AppKey("redis", redis.asyncio.Redis)
# The conversation's models (None: this deployment serves no conversation) and the one thread
# that runs their work.
ENGINE: web.AppKey[ConversationEngine | None] = web.AppKey("conversation", ConversationEngine)
MODEL_THREAD: web.AppKey[ThreadPoolExecutor] = web.AppKey("model_thread", ThreadPoolExecutor)
# The recent-popularity counts short histories' turns rank with (None: the model blends none).
RECENT: web.AppKey[RecentWindows | None] = web.AppKey("recent", RecentWindows)
# The conversation's own Redis identity (principal ``converse``: the catalog and the user's
# profile to read, the session to write), so the API's ``api`` user stays read-only on lists.
CONVERSE = "converse"
CONVERSE_REDIS: web.AppKey[redis.asyncio.Redis] = web.AppKey("converse_redis", redis.asyncio.Redis)
# The key a request was let in with (None: anonymous, on a deployment without keys); handlers
# that act on a user's data name its key_id in their audit trail.
PRINCIPAL: web.RequestKey[ApiKeyRecord | None] = web.RequestKey("principal", ApiKeyRecord)

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


def change_notice(reply: ConversationReply) -> Record:
    """A conversation turn's notice on ``profiles.changed``: the profile version the turn read
    (never ahead of the stored one, so the regeneration service accepts it) and the turn as
    its one event and trigger."""
    notice = ProfileChanged(
        user_id=reply.user_id,
        profile_version=reply.profile_version,
        changes=ProfileChanges(events=1),
        event_id=f"turn-{secrets.token_hex(8)}",
        trigger_ts=reply.generated_at,
    )
    return reply.user_id.encode(), notice.model_dump_json().encode()


def _error(status: int, code: str, message: str) -> web.Response:
    return _json(ErrorResponse.of(code, message), status)


_UNAUTHORIZED = ErrorResponse.of("unauthorized", "missing or invalid X-API-Key header")


def served_openapi(settings: ApiSettings) -> dict[str, Any]:
    """The OpenAPI document this deployment serves: the contract with its own limits filled in."""
    return openapi_document(
        max_k=settings.api_max_k,
        default_k=settings.api_default_k,
        keys=settings.api_keys_file is not None,
        server=f"http://{settings.api_host}:{settings.api_port}",
        max_events=settings.api_events_max_batch,
    )


def check_exposure(settings: ApiSettings) -> None:
    """Refuse to serve without keys where others can connect; warn where it is allowed.

    Without a keys file the read routes are open: fine on loopback (development, with a
    warning), refused on any other address unless ``api_allow_anonymous`` says so (a warning
    again). The removed plain key is refused rather than ignored, so a deployment that relied on
    it cannot silently become open.
    """
    if settings.api_key is not None:
        raise UnsafeExposureError(
            "RECSTREAM_API_KEY is no longer read: keys are stored hashed, with scopes. Create "
            "one with `recstream api keys add --scope read --name NAME --file FILE`, set "
            "RECSTREAM_API_KEYS_FILE=FILE, and unset RECSTREAM_API_KEY"
        )
    if settings.api_keys_file is not None:
        return
    if not is_loopback(settings.api_host) and not settings.api_allow_anonymous:
        raise UnsafeExposureError(
            f"the read API would serve {settings.api_host!r} without keys: set "
            "RECSTREAM_API_KEYS_FILE (`recstream api keys add`), listen on loopback, or "
            "set RECSTREAM_API_ALLOW_ANONYMOUS=true to serve reads to anyone who can connect"
        )
    log.warning(
        "no API keys file: read routes are open to anyone who can reach %s (development only)",
        settings.api_host,
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


def erasure_refusal(settings: ApiSettings) -> str | None:
    """Why this deployment cannot erase (no credentials for the ``eraser`` principal where
    services have their own), or ``None`` when it can."""
    try:
        for system in ("kafka", "redis"):
            credentials(settings, system, ERASER)
    except ConfigError as exc:
        return f"erasure is not configured on this API: {exc}"
    return None


def _erase(settings: ApiSettings, user_id: str) -> BaseModel:
    with Eraser(settings) as eraser:
        return eraser.erase(user_id).receipt()


def _export(settings: ApiSettings, user_id: str) -> BaseModel:
    with Eraser(settings) as eraser:
        return eraser.export(user_id)


def _route_name(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _scopes(app: web.Application) -> dict[web.AbstractRoute, Scope | None]:
    """Each route's scope, from :data:`SCOPES`; a route missing there is a programming error."""
    required: dict[web.AbstractRoute, Scope | None] = {}
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        method = "GET" if route.method == "HEAD" else route.method  # add_get's implicit HEAD
        if (method, path) not in SCOPES:
            raise LookupError(f"{method} {path} has no scope in schemas.openapi.SCOPES")
        required[route] = SCOPES[(method, path)]
    return required


def build_app(settings: ApiSettings) -> web.Application:
    """The application; it connects to Redis on startup.

    Reads the keys file (when set) now, so a missing or unsafe one fails the start.
    """
    keys = Keys(settings.key_prefix)
    ring = KeyRing(settings.api_keys_file) if settings.api_keys_file is not None else None
    required: dict[web.AbstractRoute, Scope | None] = {}

    def refusal(request: web.Request, scope: Scope) -> web.Response | None:
        """Why ``request`` may not use a route that needs ``scope``; ``None`` lets it in."""
        given = request.headers.get("X-API-Key")
        if ring is None:  # no keys on this deployment: the anonymous scopes, for anyone
            request[PRINCIPAL] = None
            return None if scope in ANONYMOUS_SCOPES else _json(_UNAUTHORIZED, 401)
        principal = ring.authenticate(given, datetime.now(UTC)) if given is not None else None
        if principal is None:  # absent, unknown, wrong, revoked, expired: one answer
            return _json(_UNAUTHORIZED, 401)
        if scope not in principal.scopes:
            return _error(403, "forbidden", f"this key does not have the {scope.value} scope")
        request[PRINCIPAL] = principal
        return None

    async def dispatch(request: web.Request, handler: Handler) -> web.StreamResponse:
        scope = required.get(request.match_info.route)
        if scope is not None and (refused := refusal(request, scope)) is not None:
            return refused
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own 404/405, as JSON like every error
            code = re.sub(r"[^a-z0-9]+", "_", exc.reason.lower()).strip("_")
            return _error(exc.status, code or f"http_{exc.status}", exc.reason[:256])

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        # Logs name the route's pattern and this id, never the path: it holds the user id.
        started = time.perf_counter()
        request_id = secrets.token_hex(8)
        route = _route_name(request)
        try:
            response = await dispatch(request, handler)
        except redis.RedisError as exc:  # an outage, not a bug: no traceback per request
            log.warning(
                "request %s on %s: Redis failed (%s)", request_id, route, type(exc).__name__
            )
            response = _error(503, "unavailable", "the recommendation store does not answer")
        except Exception as exc:  # one request failed; the service answers 500 and goes on
            # The frames, not the message: an exception's text may quote the data it choked on.
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error(
                "request %s on %s failed: %s\n%s", request_id, route, type(exc).__name__, frames
            )
            response = _error(500, "internal", "internal error")
        response.headers["X-Request-Id"] = request_id
        REQUESTS.labels(route, str(response.status)).inc()
        LATENCY.labels(route).observe(time.perf_counter() - started)
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

    refused_erasure = erasure_refusal(settings)

    async def on_user(
        request: web.Request, action: Callable[[ApiSettings, str], BaseModel], what: str
    ) -> web.Response:
        """Run an admin action on one user's data off the event loop (it blocks on Kafka)."""
        user_id = request.match_info["user_id"]
        if not valid_user_id(user_id):
            return _error(400, "bad_user_id", "user_id must be 1-64 characters, no control chars")
        if refused_erasure is not None:
            return _error(503, "erasure_unavailable", refused_erasure)
        principal = request.get(PRINCIPAL)
        try:
            body = await asyncio.get_running_loop().run_in_executor(None, action, settings, user_id)
        except ErasureFailed as exc:
            return _error(503, "erasure_failed", f"nothing was deleted: {exc}"[:256])
        # The audit trail names the key, never the user (logs carry no user id).
        log.info("%s of one user's data by key %s", what, principal.key_id if principal else "-")
        return _json(body)

    async def erase(request: web.Request) -> web.Response:
        return await on_user(request, _erase, "erasure")

    async def export(request: web.Request) -> web.Response:
        return await on_user(request, _export, "export")

    refused_ingestion = ingestion_refusal(settings)
    max_future = timedelta(seconds=settings.event_max_future_s)
    sink: EventSink | None = None  # made at the first accepted request, closed at cleanup

    async def read_records(request: web.Request) -> list[Record] | web.Response:
        """The records a request's body asks to produce, or the 413 or 400 that refuses it."""
        too_large = f"the body may hold at most {settings.api_max_body_bytes} bytes"
        if (request.content_length or 0) > settings.api_max_body_bytes:
            return _error(413, "body_too_large", too_large)  # refused before reading it
        try:
            body = await request.read()  # bounded by the app's client_max_size
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "body_too_large", too_large)
        try:  # up to a batch of pydantic checks: off the event loop
            return await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: parse_events(
                    body, max_events=settings.api_events_max_batch, max_future=max_future
                ),
            )
        except Refused as refused:
            EVENTS.labels(settings.topic_clickstream, "refused").inc(refused.events)
            if not refused.invalid:
                return _error(400, refused.code, refused.message)
            error = ErrorBody(code=refused.code, message=refused.message)
            return _json(EventsRejected(error=error, invalid=refused.invalid), 400)

    def working(current: EventSink | None, make: Callable[[], EventSink]) -> EventSink:
        """``current``, or a new sink where there is none or it broke (a fatal producer error:
        the old one is closed aside)."""
        if current is not None and not current.broken:
            return current
        if current is not None:
            asyncio.get_running_loop().run_in_executor(None, current.close)
        return make()

    def event_sink() -> EventSink:
        nonlocal sink
        sink = working(sink, lambda: EventSink(settings, settings.api_events_ack_timeout_s))
        return sink

    # A turn's change notice, so the regeneration service publishes the refined list (the
    # cache, frontends and analytics see it): sent as ``converse`` after the reply is made,
    # without holding the reply; an undelivered one is counted and logged (the list is then
    # refined at the user's next change).
    notices: EventSink | None = None
    sending: set[asyncio.Task[None]] = set()

    async def send_notice(record: Record) -> None:
        nonlocal notices
        try:
            notices = working(
                notices,
                lambda: EventSink(
                    settings,
                    settings.api_events_ack_timeout_s,
                    topic=settings.topic_profiles_changed,
                    principal=CONVERSE,
                ),
            )
            await notices.send([record])
        except (IngestFailed, ConfigError) as exc:
            NOTICES.labels("failed").inc()
            log.warning("%s: change notice not sent: %s", CONVERSATION_PATH, exc)
            return
        NOTICES.labels("sent").inc()

    def announce(reply: ConversationReply) -> None:
        if reply.profile_version < 1:  # no profile: nothing to regenerate
            return
        task = asyncio.create_task(send_notice(change_notice(reply)))
        sending.add(task)
        task.add_done_callback(sending.discard)

    async def post_events(request: web.Request) -> web.Response:
        if refused_ingestion is not None:
            return _error(503, "ingestion_unavailable", refused_ingestion)
        records = await read_records(request)
        if isinstance(records, web.Response):
            return records
        try:
            await event_sink().send(records)
        except IngestFailed as exc:
            EVENTS.labels(settings.topic_clickstream, "failed").inc(len(records))
            log.warning("%s: %s", EVENTS_PATH, exc)  # counts and Kafka's error name, no event
            return _error(503, "ingestion_failed", str(exc)[:256])
        EVENTS.labels(settings.topic_clickstream, "accepted").inc(len(records))
        return _json(EventsAccepted(accepted=len(records)), 202)

    async def conversation(request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        if not valid_user_id(user_id):
            return _error(400, "bad_user_id", "user_id must be 1-64 characters, no control chars")
        engine = request.app[ENGINE]
        if engine is None:
            return _error(503, "conversation_unavailable", "this deployment serves no conversation")
        too_large = f"a turn's body may hold at most {MAX_CONVERSATION_BODY} bytes"
        if (request.content_length or 0) > MAX_CONVERSATION_BODY:
            return _error(413, "body_too_large", too_large)
        body = await request.content.read(MAX_CONVERSATION_BODY + 1)
        if len(body) > MAX_CONVERSATION_BODY:
            return _error(413, "body_too_large", too_large)
        try:
            turn = parse_request(body)
            reply = await run_turn(
                engine,
                request.app[MODEL_THREAD],
                request.app[CONVERSE_REDIS],
                keys=keys,
                user_id=user_id,
                request=turn,
                k=settings.api_default_k,
                ttl_s=settings.api_conversation_ttl_s,
                variant=settings.api_variant,
                recent=request.app[RECENT],
            )
        except TurnRefused as refused:
            r = refused.refusal
            return _error(r.status, r.code, r.message)
        announce(reply)
        return _json(reply)

    async def healthz(request: web.Request) -> web.Response:
        try:
            ok = bool(await request.app[REDIS].ping())
        except redis.RedisError:
            ok = False
        return _json(Health(ok=ok), 200 if ok else 503)

    document = orjson.dumps(served_openapi(settings))

    async def openapi(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    async def connect(app: web.Application) -> None:
        app[REDIS] = async_redis_client(settings)
        app[MODEL_THREAD] = ThreadPoolExecutor(1, thread_name_prefix="conversation")
        app[ENGINE] = app[RECENT] = None
        folder = settings.api_conversation_model_dir
        if folder is not None:  # loaded before serving: a turn never waits for a model load
            app[CONVERSE_REDIS] = async_redis_client(settings, CONVERSE)
            attributes = await load_attributes(app[CONVERSE_REDIS], keys)
            engine = await asyncio.get_running_loop().run_in_executor(
                app[MODEL_THREAD], ConversationEngine.load, folder, attributes
            )
            app[ENGINE] = engine
            if engine.recent_days > 0:
                app[RECENT] = RecentWindows(
                    app[CONVERSE_REDIS],
                    keys,
                    engine.recent_days,
                    refresh_s=settings.api_trending_refresh_s,
                )

    async def disconnect(app: web.Application) -> None:
        nonlocal sink, notices
        if sending:  # notices on their way: a last chance, bounded by their ack timeout
            await asyncio.wait(sending, timeout=settings.api_events_ack_timeout_s)
        if notices is not None:
            closing_notices, notices = notices, None
            await asyncio.get_running_loop().run_in_executor(None, closing_notices.close)
        await app[REDIS].aclose()
        if CONVERSE_REDIS in app:
            await app[CONVERSE_REDIS].aclose()
        app[MODEL_THREAD].shutdown(wait=True)
        if sink is not None:  # dropped once closed, so the client itself goes with it
            closing, sink = sink, None
            await asyncio.get_running_loop().run_in_executor(None, closing.close)

    app = web.Application(middlewares=[guard], client_max_size=settings.api_max_body_bytes)
    # Each route's scope is declared in schemas.openapi.SCOPES (which the OpenAPI document also
    # reads); _scopes refuses a route that is not declared there.
    app.router.add_get(RECOMMENDATIONS_PATH, recommendations)
    app.router.add_delete(USER_PATH, erase)
    app.router.add_get(EXPORT_PATH, export)
    app.router.add_post(EVENTS_PATH, post_events)
    app.router.add_post(CONVERSATION_PATH, conversation)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/openapi.json", openapi)
    required.update(_scopes(app))
    app.on_startup.append(connect)
    app.on_cleanup.append(disconnect)
    return app


def build_metrics_app() -> web.Application:
    """``GET /metrics`` alone: served on its own port, which the API's clients never reach."""

    async def metrics(_request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest())
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


def _metrics_site(settings: ApiSettings) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that serves :func:`build_metrics_app` while the API runs."""

    async def serve(_app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(build_metrics_app(), **SERVER_OPTIONS)
        await runner.setup()
        await web.TCPSite(runner, settings.api_metrics_host, settings.api_metrics_port).start()
        log.info(
            "metrics on http://%s:%d/metrics", settings.api_metrics_host, settings.api_metrics_port
        )
        try:
            yield
        finally:
            await runner.cleanup()

    return serve


# How the API's server runs: no access log, whose lines would carry every path (and so every user
# id) and cost more than the read they log. Tests serve the app with the same options.
SERVER_OPTIONS: dict[str, Any] = {"access_log": None}


def run(settings: ApiSettings) -> None:
    """Serve until SIGINT/SIGTERM (aiohttp stops accepting, finishes requests, cleans up)."""
    import uvloop

    check_exposure(settings)
    app = build_app(settings)
    if settings.api_metrics_port:
        app.cleanup_ctx.append(_metrics_site(settings))
    log.info("read API on http://%s:%d", settings.api_host, settings.api_port)
    web.run_app(
        app,
        host=settings.api_host,
        port=settings.api_port,
        **SERVER_OPTIONS,
        print=None,
        loop=uvloop.new_event_loop(),  # a faster loop: lower tail latency per request
    )
