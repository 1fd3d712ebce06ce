"""Errors of the schemas package."""

from __future__ import annotations

from enum import StrEnum

from recstream.errors import RecstreamError


class Reason(StrEnum):
    """Machine-friendly reason codes for events that fail validation (dead-letter headers)."""

    BAD_UTF8 = "bad_utf8"
    BAD_JSON = "bad_json"
    NOT_OBJECT = "not_object"
    OVERSIZE = "oversize"
    UNSUPPORTED_SCHEMA_VERSION = "unsupported_schema_version"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    EXTRA_FIELD = "extra_field"
    BAD_FIELD = "bad_field"
    BAD_ID = "bad_id"
    BAD_TS = "bad_ts"
    TS_IN_FUTURE = "ts_in_future"
    DWELL_RULES = "dwell_rules"
    BAD_CONTEXT = "bad_context"
    KEY_MISMATCH = "key_mismatch"


class SchemaError(RecstreamError):
    """Base class of the schemas package's errors."""


class ValidationFailed(SchemaError):  # noqa: N818 - the contract's name for a rejected event
    """An event was rejected; ``reason`` is a stable code, ``detail`` a short human message."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
