"""The wire contracts of recstream: clickstream events, the messages built from them, and the
read API's response bodies."""

from schemas.api import ApiKeyRecord, ErrorBody, ErrorResponse, Health, Scope
from schemas.erasure import UserErased
from schemas.events import (
    MAX_EVENT_BYTES,
    SCHEMA_VERSION,
    ClickEvent,
    DwellEvent,
    Event,
    ViewEvent,
    parse_event,
)
from schemas.exceptions import Reason, SchemaError, ValidationFailed
from schemas.messages import (
    Envelope,
    HistoryReason,
    ModelRef,
    PopularNow,
    Profile,
    ProfileChanged,
    ProfileChanges,
    Recommendations,
    ScoredItem,
)

__all__ = [
    "MAX_EVENT_BYTES",
    "SCHEMA_VERSION",
    "ApiKeyRecord",
    "ClickEvent",
    "DwellEvent",
    "Envelope",
    "ErrorBody",
    "ErrorResponse",
    "Event",
    "Health",
    "HistoryReason",
    "ModelRef",
    "PopularNow",
    "Profile",
    "ProfileChanged",
    "ProfileChanges",
    "Reason",
    "Recommendations",
    "SchemaError",
    "Scope",
    "ScoredItem",
    "UserErased",
    "ValidationFailed",
    "ViewEvent",
    "parse_event",
]
