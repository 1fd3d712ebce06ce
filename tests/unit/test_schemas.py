"""The clickstream contract: what parse_event accepts, what it rejects and why."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import schemas
from schemas import (
    ClickEvent,
    DwellEvent,
    Reason,
    ValidationFailed,
    ViewEvent,
    parse_event,
)
from schemas.export import export, stale

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def good(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "schema_version": 1,
        "event_id": "e-1",
        "type": "dwell",
        "user_id": "u1",
        "item_id": "i9",
        "ts": "2024-05-01T11:59:00+02:00",
        "dwell_ms": 1500,
    }
    for key, value in changes.items():
        if value is _DROP:
            event.pop(key, None)
        else:
            event[key] = value
    return event


_DROP = object()


def reason_of(raw: bytes) -> Reason:
    with pytest.raises(ValidationFailed) as info:
        parse_event(raw, now=NOW)
    return info.value.reason


def test_each_type_parses_to_its_model() -> None:
    dwell = parse_event(orjson.dumps(good()), now=NOW)
    assert isinstance(dwell, DwellEvent)
    assert dwell.dwell_ms == 1500
    assert dwell.ts == datetime(2024, 5, 1, 9, 59, tzinfo=UTC)
    assert dwell.ts.utcoffset() == timedelta(hours=2)
    click = parse_event(orjson.dumps(good(type="click", dwell_ms=_DROP)), now=NOW)
    view = parse_event(orjson.dumps(good(type="view", dwell_ms=_DROP)), now=NOW)
    assert isinstance(click, ClickEvent)
    assert isinstance(view, ViewEvent)


def test_optional_session_and_context() -> None:
    event = parse_event(
        orjson.dumps(good(session_id="s-1", context={"page": "home", "rank": 3, "score": 0.5})),
        now=NOW,
    )
    assert event.session_id == "s-1"
    assert event.context == {"page": "home", "rank": 3, "score": 0.5}


def test_events_are_frozen() -> None:
    event = parse_event(orjson.dumps(good()), now=NOW)
    with pytest.raises(ValueError, match="frozen"):
        event.user_id = "other"  # type: ignore[misc]  # assigning on purpose to prove it fails


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xff\xfe{}", Reason.BAD_UTF8),
        (b'{"schema_version": 1,', Reason.BAD_JSON),
        (b"", Reason.BAD_JSON),
        (b"[1, 2]", Reason.NOT_OBJECT),
        (b'"text"', Reason.NOT_OBJECT),
        (b"{" + b'"x": "' + b"a" * 17000 + b'"}', Reason.OVERSIZE),
        (orjson.dumps(good(schema_version=2)), Reason.UNSUPPORTED_SCHEMA_VERSION),
        (orjson.dumps(good(schema_version="1")), Reason.UNSUPPORTED_SCHEMA_VERSION),
        (orjson.dumps(good(schema_version=True)), Reason.UNSUPPORTED_SCHEMA_VERSION),
        (orjson.dumps(good(schema_version=_DROP)), Reason.MISSING_FIELD),
        (orjson.dumps(good(type="purchase")), Reason.UNKNOWN_TYPE),
        (orjson.dumps(good(type=["click"])), Reason.UNKNOWN_TYPE),
        (orjson.dumps(good(type=_DROP)), Reason.MISSING_FIELD),
        (orjson.dumps(good(item_id=_DROP)), Reason.MISSING_FIELD),
        (orjson.dumps(good(color="red")), Reason.EXTRA_FIELD),
        (orjson.dumps(good(user_id="")), Reason.BAD_ID),
        (orjson.dumps(good(user_id="x" * 65)), Reason.BAD_ID),
        (orjson.dumps(good(item_id="a\nb")), Reason.BAD_ID),
        (orjson.dumps(good(event_id=7)), Reason.BAD_ID),
        (orjson.dumps(good(session_id="\x7f")), Reason.BAD_ID),
        (orjson.dumps(good(ts="2024-05-01T11:59:00")), Reason.BAD_TS),
        (orjson.dumps(good(ts="2024-05-01")), Reason.BAD_TS),
        (orjson.dumps(good(ts=1714564740)), Reason.BAD_TS),
        (orjson.dumps(good(ts="2024-13-01T11:59:00Z")), Reason.BAD_TS),
        (orjson.dumps(good(ts="2024-05-01T12:06:00Z")), Reason.TS_IN_FUTURE),
        (orjson.dumps(good(dwell_ms=_DROP)), Reason.DWELL_RULES),
        (orjson.dumps(good(dwell_ms=-1)), Reason.DWELL_RULES),
        (orjson.dumps(good(dwell_ms=1.5)), Reason.DWELL_RULES),
        (orjson.dumps(good(dwell_ms="10")), Reason.DWELL_RULES),
        (orjson.dumps(good(type="click")), Reason.DWELL_RULES),
        (orjson.dumps(good(context={"a": True})), Reason.BAD_CONTEXT),
        (orjson.dumps(good(context={"a": "x" * 300})), Reason.BAD_CONTEXT),
        (orjson.dumps(good(context={"a": {"b": 1}})), Reason.BAD_CONTEXT),
        (orjson.dumps(good(context=[1])), Reason.BAD_CONTEXT),
    ],
)
def test_rejections_carry_a_reason(raw: bytes, reason: Reason) -> None:
    assert reason_of(raw) is reason


def test_future_bound_is_a_setting() -> None:
    raw = orjson.dumps(good(ts="2024-05-01T12:06:00Z"))
    assert parse_event(raw, now=NOW, max_future=timedelta(minutes=10)).ts.minute == 6
    assert reason_of(raw) is Reason.TS_IN_FUTURE


def test_reason_and_detail_are_short_and_machine_friendly() -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_event(orjson.dumps(good(user_id="")), now=NOW)
    assert info.value.reason == "bad_id"
    assert info.value.detail.startswith("user_id:")
    assert len(info.value.detail) <= 200


_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json = st.recursive(
    _json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_validation_failed(raw: bytes) -> None:
    try:
        parse_event(raw, now=NOW)
    except ValidationFailed as exc:
        assert isinstance(exc.reason, Reason)


@settings(max_examples=300)
@given(_json)
def test_arbitrary_json_values_are_rejected_with_a_reason(value: Any) -> None:
    with pytest.raises(ValidationFailed):
        parse_event(json.dumps(value).encode(), now=NOW)


@settings(max_examples=300)
@given(
    field=st.sampled_from(sorted(good())),
    replacement=_json,
)
def test_corrupting_one_field_is_rejected_or_still_valid(field: str, replacement: Any) -> None:
    raw = json.dumps(good(**{field: replacement})).encode()
    try:
        event = parse_event(raw, now=NOW)
    except ValidationFailed as exc:
        assert isinstance(exc.reason, Reason)
    else:
        # Only a replacement that itself satisfies the contract may pass, unchanged.
        assert getattr(event, field) == replacement or field == "ts"


ids = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=64).filter(
    lambda s: not any(0x7F <= ord(c) <= 0x9F for c in s)
)


@settings(max_examples=200)
@given(
    kind=st.sampled_from(["click", "view", "dwell"]),
    event_id=ids,
    user_id=ids,
    item_id=ids,
    seconds=st.integers(min_value=0, max_value=2_000_000_000),
    offset_min=st.integers(min_value=-12 * 60, max_value=14 * 60),
    dwell_ms=st.integers(min_value=0, max_value=24 * 3600 * 1000),
)
def test_valid_events_round_trip(
    *,
    kind: str,
    event_id: str,
    user_id: str,
    item_id: str,
    seconds: int,
    offset_min: int,
    dwell_ms: int,
) -> None:
    ts = datetime.fromtimestamp(seconds, timezone(timedelta(minutes=offset_min)))
    body: dict[str, Any] = {
        "schema_version": 1,
        "event_id": event_id,
        "type": kind,
        "user_id": user_id,
        "item_id": item_id,
        "ts": ts.isoformat(),
    }
    if kind == "dwell":
        body["dwell_ms"] = dwell_ms
    event = parse_event(orjson.dumps(body), now=datetime(2040, 1, 1, tzinfo=UTC))
    assert (event.event_id, event.user_id, event.item_id, event.ts) == (
        event_id,
        user_id,
        item_id,
        ts,
    )
    again = parse_event(event.model_dump_json().encode(), now=datetime(2040, 1, 1, tzinfo=UTC))
    assert again == event


def test_json_schema_files_are_in_sync_with_models() -> None:
    assert stale() == [], "run `python -m schemas.export` and commit schemas/json"


def test_export_writes_every_contract_and_flags_files_no_model_writes(tmp_path: Path) -> None:
    written = {path.name for path in export(tmp_path)}
    assert {"clickstream-event.json", "recommendations.json", "openapi.json"} <= written
    assert stale(tmp_path) == []
    (tmp_path / "retired.json").write_text("{}\n", encoding="utf-8")
    (tmp_path / "openapi.json").write_text("{}\n", encoding="utf-8")
    assert stale(tmp_path) == ["openapi.json", "retired.json"]


def test_public_surface() -> None:
    assert sorted(schemas.__all__) == sorted(set(schemas.__all__))
    for name in schemas.__all__:
        assert hasattr(schemas, name), name
    assert {"parse_event", "ValidationFailed", "Envelope", "Profile", "Recommendations"} <= set(
        schemas.__all__
    )
