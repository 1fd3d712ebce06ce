"""The regeneration core shared by the live consumer and the operator replay."""

from __future__ import annotations

from datetime import UTC, datetime

from consumers.metrics import ORIGIN_HEADER
from consumers.regenerate import model_history, origin_headers
from schemas import Profile


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
