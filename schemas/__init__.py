"""The wire contracts of recstream: clickstream events and the messages built from them."""

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
    ModelRef,
    Profile,
    ProfileChanged,
    ProfileChanges,
    Recommendations,
    ScoredItem,
)

__all__ = [
    "MAX_EVENT_BYTES",
    "SCHEMA_VERSION",
    "ClickEvent",
    "DwellEvent",
    "Envelope",
    "Event",
    "ModelRef",
    "Profile",
    "ProfileChanged",
    "ProfileChanges",
    "Reason",
    "Recommendations",
    "SchemaError",
    "ScoredItem",
    "ValidationFailed",
    "ViewEvent",
    "parse_event",
]
