"""``POST /v1/events`` without Kafka: the body's checks, held to the stream worker's, and the
route's refusals (keys, scope, size, shape, missing producer credentials, a broker that does not
answer).

The agreement test feeds every generated event both to :func:`api.ingest.parse_events` and, as
the record the API would produce, to the stream worker's :class:`streams.ProfileFolder` (Redis
replaced by a recorder): the API must accept exactly the events the fold does not dead-letter,
and refuse the others with the reason code the dead letter carries.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from api import ApiSettings, build_app
from api.ingest import Refused, ingestion_refusal, parse_events
from api.keys import add_key, new_key
from api.metrics import EVENTS
from schemas import Envelope
from schemas.api import ErrorResponse, EventsRejected, InvalidEvent, Scope
from schemas.deadletter import HEADER_REASON, HEADER_SOURCE_OFFSET
from schemas.exceptions import Reason
from schemas.openapi import EVENTS_PATH, openapi_document
from streams import ProfileFolder
from streams.fold import Folded
from streams.settings import StreamsSettings
from tests.api_contract import assert_conforms, assert_request_conforms

NOBODY_LISTENS = SecretStr("redis://127.0.0.1:1/0")
NO_BROKER = "127.0.0.1:1"
MAX_FUTURE = timedelta(minutes=5)


def view(eid: str, user: str = "u1", **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema_version": 1,
        "event_id": eid,
        "type": "view",
        "user_id": user,
        "item_id": "i1",
        "ts": "2026-01-01T00:00:00Z",
    }
    body.update(changes)
    return body


def _parse(body: Any, max_events: int = 500) -> list[tuple[bytes, bytes]]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_events(raw, max_events=max_events, max_future=MAX_FUTURE)


def test_one_event_or_a_batch_becomes_records_keyed_by_user() -> None:
    single = view("e1", "alice")
    assert _parse(single) == [(b"alice", orjson.dumps(single))]
    batch = [view("e1", "alice"), view("e2", "bob", type="dwell", dwell_ms=5)]
    assert _parse({"events": batch}) == [(e["user_id"].encode(), orjson.dumps(e)) for e in batch]
    # Whitespace and key order of the body do not matter: what is produced is compact JSON.
    spaced = b'{ "events" : [ ' + orjson.dumps(single, option=orjson.OPT_INDENT_2) + b" ] }"
    assert _parse(spaced) == [(b"alice", orjson.dumps(single))]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "bad_body"),
        (b"\xff\xfe", "bad_body"),
        (b"[]", "bad_body"),
        (b'"view"', "bad_body"),
        (b'{"events": []}', "bad_body"),
        (b'{"events": {}}', "bad_body"),
        (b'{"events": [], "more": 1}', "bad_body"),
        (orjson.dumps({"events": [view(str(n)) for n in range(4)]}), "too_many_events"),
    ],
)
def test_bodies_that_are_not_an_event_or_a_batch_are_refused(body: bytes, code: str) -> None:
    with pytest.raises(Refused) as refused:
        _parse(body, max_events=3)
    assert (refused.value.code, refused.value.invalid) == (code, ())


def test_a_batch_with_invalid_events_is_refused_whole_by_index_and_reason() -> None:
    secret_user = "user-7f3a-secret"
    now = datetime.now(UTC)
    events = [
        view("ok", secret_user),
        view("far", secret_user, ts=(now + timedelta(hours=1)).isoformat()),
        view("old", secret_user, ts="1969-12-31T23:59:59Z"),
        view("ok2", secret_user),
        view("x", secret_user, type="purchase"),
        view("y", secret_user, extra=secret_user),
        view("z", secret_user, dwell_ms=3),
        view("w", secret_user + "\x00"),
        "not an object",
    ]
    with pytest.raises(Refused) as caught:
        _parse({"events": events})
    refused = caught.value
    assert refused.code == "invalid_events"
    assert refused.events == len(events)
    assert refused.invalid == (
        InvalidEvent(index=1, reason=Reason.TS_IN_FUTURE),
        InvalidEvent(index=2, reason=Reason.BAD_TS),
        InvalidEvent(index=4, reason=Reason.UNKNOWN_TYPE),
        InvalidEvent(index=5, reason=Reason.EXTRA_FIELD),
        InvalidEvent(index=6, reason=Reason.DWELL_RULES),
        InvalidEvent(index=7, reason=Reason.BAD_ID),
        InvalidEvent(index=8, reason=Reason.NOT_OBJECT),
    )
    assert secret_user not in refused.message


# --- The API accepts exactly what the fold accepts --------------------------------------------

PRINTABLE_IDS = st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=8)
# JSON numbers as orjson writes them: 64-bit integers.
INTS = st.integers(-(2**63), 2**64 - 1)
IDS = st.one_of(
    st.text(min_size=1, max_size=8),
    st.just(""),
    st.just("x" * 65),
    st.sampled_from(["a\x00b", "\x85", "é", "a b"]),
    st.integers(-5, 5),
    st.none(),
)
TIMESTAMPS = st.one_of(
    st.datetimes(
        min_value=datetime(1960, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ).map(lambda d: d.isoformat()),
    st.sampled_from(
        [
            "2026-01-01T00:00:00",
            "2026-01-01 00:00:00+02:00",
            "2026-01-01t00:00:00z",
            "1970-01-01T00:00:00Z",
            "1969-12-31T23:59:59.999Z",
            "0001-01-01T00:00:00Z",
            "not a time",
        ]
    ),
    st.integers(0, 2_000_000_000),
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "schema_version": st.sampled_from([1, 2, "1", True, 1.0]),
    "event_id": IDS,
    "user_id": IDS,
    "item_id": IDS,
    "session_id": IDS,
    "type": st.sampled_from(["view", "click", "dwell", "buy", "", 3]),
    "ts": TIMESTAMPS,
    "dwell_ms": st.one_of(st.integers(-1, 24 * 3600 * 1000 + 1), st.floats(), st.text(max_size=2)),
    "context": st.one_of(
        st.dictionaries(
            st.text(max_size=3),
            st.one_of(st.text(max_size=4), INTS, st.floats(), st.booleans()),
            max_size=40,
        ),
        st.none(),
        st.lists(INTS, max_size=2),
    ),
    "extra": INTS,
}


@st.composite
def candidate_events(draw: st.DrawFn) -> Any:
    """Events near the contract: a valid one with some fields dropped, changed or added."""
    body = view(draw(PRINTABLE_IDS), draw(PRINTABLE_IDS))
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), max_size=3, unique=True)):
        if draw(st.booleans()) and name in body:
            del body[name]
        else:
            body[name] = draw(FIELD_VALUES[name])
    return body if draw(st.integers(0, 20)) < 19 else draw(st.sampled_from([[body], "e", None]))


class _Recorder:
    """The fold script's stand-in: records what would be folded."""

    async def run(
        self,
        groups: Mapping[str, Sequence[tuple[Any, ...]]],
        progress: object = None,
        fields: Mapping[str, str] | None = None,
    ) -> list[Folded]:
        return [
            Folded(user, 1, len(evs), 0, 0, False, 0.0, evs[-1][0], evs[-1][2], (evs[0][1],))
            for user, evs in groups.items()
        ]


def _fold_verdicts(records: list[tuple[bytes, bytes]]) -> list[str | None]:
    """For each record, the dead letter's reason the stream worker gives it, or None (folded)."""
    dead: dict[int, str] = {}

    async def send_dlq(**kwargs: Any) -> None:
        reason = dict(kwargs["headers"])[HEADER_REASON].decode()
        dead[int(dict(kwargs["headers"])[HEADER_SOURCE_OFFSET])] = reason

    async def ignore(**_kwargs: Any) -> None:
        pass

    async def fold() -> None:
        client = redis.asyncio.Redis.from_url(NOBODY_LISTENS.get_secret_value())
        folder = ProfileFolder(StreamsSettings(), client, send_dlq, ignore)
        folder.script = _Recorder()  # type: ignore[assignment]  # a recorder instead of Redis
        envelopes = [
            Envelope("clickstream", 0, n, key, value) for n, (key, value) in enumerate(records)
        ]
        await folder.handle(envelopes)
        await client.aclose()

    asyncio.run(fold())
    return [dead.get(n) for n in range(len(records))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(candidate_events(), min_size=1, max_size=8))
def test_the_api_accepts_exactly_what_the_fold_accepts(events: list[Any]) -> None:
    verdicts: list[str | None] = []
    records: list[tuple[bytes, bytes]] = []
    for item in events:
        try:
            ((key, value),) = _parse({"events": [item]})
            verdicts.append(None)
            records.append((key, value))
        except Refused as refused:
            (invalid,) = refused.invalid
            verdicts.append(invalid.reason.value)
            # What a producer would have sent instead: the same bytes, keyed by the user id.
            user = item.get("user_id") if isinstance(item, dict) else None
            records.append((str(user).encode(), orjson.dumps(item)))
    assert _fold_verdicts(records) == verdicts


# --- The route --------------------------------------------------------------------------------


def _settings(tmp_path: Path, **changes: Any) -> tuple[ApiSettings, dict[str, str]]:
    path = tmp_path / "api-keys.jsonl"
    made = {}
    for scope in Scope:
        key, record = new_key([scope], f"k-{scope.value}")
        add_key(path, record)
        made[scope.value] = key
    base = ApiSettings(
        redis_url=NOBODY_LISTENS,
        kafka_bootstrap=NO_BROKER,
        api_keys_file=path,
        api_events_ack_timeout_s=0.5,
    )
    return base.model_copy(update=changes), made


async def _post(
    settings: ApiSettings, calls: list[tuple[bytes, dict[str, str]]]
) -> list[tuple[int, bytes]]:
    out = []
    async with TestClient(TestServer(build_app(settings))) as client:
        for body, headers in calls:
            response = await client.post(EVENTS_PATH, data=body, headers=headers)
            out.append((response.status, await response.read()))
    return out


def test_the_route_refuses_before_it_produces(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Keys and scope, shape, count and size are checked before any producer exists (there is no
    broker here, so a request that reached Kafka would be a 503)."""
    settings, keys = _settings(tmp_path, api_max_body_bytes=2048, api_events_max_batch=3)
    events = {"X-API-Key": keys["events"]}
    user = "user-7f3a-secret"
    mixed = orjson.dumps({"events": [view("a", user), view("b", user, type="buy")]})
    calls = [
        (orjson.dumps(view("a", user)), {}),
        (orjson.dumps(view("a", user)), {"X-API-Key": keys["read"]}),
        (orjson.dumps(view("a", user)), {"X-API-Key": keys["admin"]}),
        (mixed, events),
        (orjson.dumps({"events": [view(str(n), user) for n in range(4)]}), events),
        (b"{" + b" " * 4096 + b"}", events),
        (b"nope", events),
    ]
    refused = EVENTS.labels(settings.topic_clickstream, "refused")
    before = refused._value.get()
    with caplog.at_level(logging.DEBUG):
        results = asyncio.run(_post(settings, calls))
    assert [status for status, _ in results] == [401, 403, 403, 400, 400, 413, 400]
    assert refused._value.get() - before == 2 + 4
    rejected = EventsRejected.model_validate_json(results[3][1])
    assert rejected.error.code == "invalid_events"
    assert rejected.invalid == (InvalidEvent(index=1, reason=Reason.UNKNOWN_TYPE),)
    codes = [ErrorResponse.model_validate_json(body).error.code for _, body in results[4:]]
    assert codes == ["too_many_events", "body_too_large", "bad_body"]
    document = openapi_document()
    for status, body in results:
        assert user.encode() not in body
        assert_conforms(document, EVENTS_PATH, status, body, method="post")
    assert_request_conforms(document, EVENTS_PATH, "post", orjson.loads(mixed)["events"][0])
    assert user not in caplog.text and keys["events"] not in caplog.text


def test_without_producer_credentials_a_secure_deployment_answers_503(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    for system in ("kafka", "redis"):
        (secrets / system).mkdir(parents=True)
        (secrets / system / "api").write_text("not-used")  # the API's own; no producer's
    settings, keys = _settings(tmp_path, secrets_dir=secrets)
    assert ingestion_refusal(settings) is not None
    assert ingestion_refusal(settings.model_copy(update={"secrets_dir": None})) is None
    ((status, body),) = asyncio.run(
        _post(settings, [(orjson.dumps(view("a")), {"X-API-Key": keys["events"]})])
    )
    assert status == 503
    error = ErrorResponse.model_validate_json(body).error
    assert error.code == "ingestion_unavailable"
    assert str(secrets) not in error.message  # the operator's log has the path, not the client
    assert_conforms(openapi_document(), EVENTS_PATH, status, body, method="post")


def test_a_broker_that_does_not_ack_in_time_is_a_503(tmp_path: Path) -> None:
    settings, keys = _settings(tmp_path)
    failed = EVENTS.labels(settings.topic_clickstream, "failed")
    before = failed._value.get()
    batch = orjson.dumps({"events": [view("a"), view("b", "u2")]})
    ((status, body),) = asyncio.run(_post(settings, [(batch, {"X-API-Key": keys["events"]})]))
    assert status == 503
    error = ErrorResponse.model_validate_json(body).error
    assert error.code == "ingestion_failed"
    assert failed._value.get() - before == 2
    assert_conforms(openapi_document(), EVENTS_PATH, status, body, method="post")
