"""The regeneration core shared by the live consumer and the operator replay, and the gates
both consumers put records through: the origin header and the dead-letter reasons."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.deadletter import DeadReason, RecordRefusedError, decode
from consumers.metrics import BAD_HEADERS, ORIGIN_HEADER, origin_ts, parse_origin_ms
from consumers.regenerate import model_history, origin_headers
from schemas import Profile, ProfileChanged


def test_models_get_the_history_oldest_first() -> None:
    profile = Profile(
        user_id="u",
        version=3,
        event_count=3,
        last_event_ts=datetime(2024, 1, 1, tzinfo=UTC),
        half_life_s=60.0,
        recent_items=["newest", "middle", "oldest"],  # as stored: newest interaction first
        item_weights={},
        category_affinities={},
    )
    assert model_history(profile) == ["oldest", "middle", "newest"]


def test_the_origin_header_is_epoch_milliseconds_or_absent() -> None:
    assert origin_headers(None) is None
    assert origin_headers(1_700_000_002.5004) == [(ORIGIN_HEADER, b"1700000002500")]


@given(st.integers(min_value=0, max_value=10**15 - 1))
def test_an_origin_header_round_trips(ms: int) -> None:
    assert parse_origin_ms(b"%d" % ms) == ms / 1000.0


@pytest.mark.parametrize(
    "raw",
    [b"9" * 400, b"-1", b"+5", b"nan", b"NaN", b"1e3", b" 12", b"12 ", b"", b"\xff\xfe", None],
)
def test_a_hostile_origin_header_is_ignored_never_an_error(raw: bytes | None) -> None:
    # 400 digits used to overflow the float division and crash-loop both consumers.
    assert parse_origin_ms(raw) is None


def test_a_bad_origin_header_reads_as_absent_and_is_counted() -> None:
    class Record:
        def headers(self) -> list[tuple[str, bytes]]:
            return [(ORIGIN_HEADER, b"1" * 400)]

    before = BAD_HEADERS.labels("regen", ORIGIN_HEADER)._value.get()
    assert origin_ts(Record(), "regen") is None
    assert BAD_HEADERS.labels("regen", ORIGIN_HEADER)._value.get() == before + 1


def _change(**fields: object) -> bytes:
    body: dict[str, object] = {
        "schema_version": 1,
        "user_id": "u1",
        "profile_version": 3,
        "changes": {"events": 1},
        "event_id": "e1",
        "trigger_ts": "2026-01-01T00:00:00Z",
        **fields,
    }
    return orjson.dumps({k: v for k, v in body.items() if v is not MISSING})


MISSING = object()


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"u1", None, DeadReason.TOMBSTONE),
        (b"u1", b"\xff" * 10, DeadReason.BAD_UTF8),
        (b"u1", b"{not json", DeadReason.BAD_JSON),
        (b"u1", b"[1, 2]", DeadReason.NOT_AN_OBJECT),
        (b"u1", _change(event_id=MISSING), DeadReason.MISSING_FIELD),
        (b"u1", _change(admin=True), DeadReason.EXTRA_FIELD),
        (b"u1", _change(schema_version=2), DeadReason.SCHEMA_VERSION),
        (b"u1\n", _change(user_id="u1\n"), DeadReason.BAD_ID),
        (b"u" * 65, _change(user_id="u" * 65), DeadReason.BAD_ID),
        (b"u1", _change(profile_version=0), DeadReason.INVALID_FIELD),
        (b"victim", _change(), DeadReason.KEY_MISMATCH),
        (None, _change(), DeadReason.KEY_MISMATCH),
        (b"u1", _change(event_id="x" * 20_000), DeadReason.OVERSIZE),
    ],
)
def test_each_unusable_record_gets_its_own_reason(
    key: bytes | None, value: bytes | None, reason: DeadReason
) -> None:
    with pytest.raises(RecordRefusedError) as refused:
        decode(ProfileChanged, key, value, max_bytes=16 * 1024)
    assert refused.value.reason is reason


def test_a_good_record_decodes() -> None:
    change = decode(ProfileChanged, b"u1", _change(), max_bytes=16 * 1024)
    assert (change.user_id, change.profile_version) == ("u1", 3)
