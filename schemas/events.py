"""Clickstream events: the public wire contract of topic ``clickstream`` (see DESIGN.md).

A producer sends a UTF-8 JSON object keyed by ``user_id``. Models here are the one source of truth:
they are frozen, strict (no type coercion, unknown fields rejected) and carry timezone-aware
timestamps. :func:`parse_event` is the fast path the stream processor uses: it turns raw bytes into
an event or raises :class:`~schemas.exceptions.ValidationFailed` with a stable reason code.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, ClassVar, Final, Literal

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StringConstraints,
    TypeAdapter,
)
from pydantic import ValidationError as PydanticValidationError

from schemas.exceptions import Reason, ValidationFailed

SCHEMA_VERSION: Final = 1
MAX_EVENT_BYTES: Final = 16 * 1024
DEFAULT_MAX_FUTURE: Final = timedelta(minutes=5)
MAX_DWELL_MS: Final = 24 * 3600 * 1000
MAX_CONTEXT_ENTRIES: Final = 32
EVENT_TYPES: Final = ("click", "view", "dwell")

# RFC 3339 date-time: full date, "T" (or space), full time, optional fraction, mandatory offset.
_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)


_ID_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]+$"


def _rfc3339(value: Any) -> Any:
    """Accept only RFC 3339 strings with an offset (or aware datetimes built in Python)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.match(value):
        raise ValueError("ts must be an RFC 3339 timestamp with a UTC offset")
    text = value.replace("z", "Z").replace("t", "T")
    return datetime.fromisoformat(text)


Id = Annotated[
    str,
    StringConstraints(
        strict=True, min_length=1, max_length=64, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$"
    ),
]
"""An identifier: 1-64 characters, no C0/C1 control characters."""

Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]
"""An RFC 3339 timestamp that must carry its UTC offset."""

ContextValue = (
    Annotated[str, StringConstraints(strict=True, max_length=256)] | StrictInt | StrictFloat
)
Context = Annotated[
    dict[Annotated[str, StringConstraints(min_length=1, max_length=64)], ContextValue],
    Field(max_length=MAX_CONTEXT_ENTRIES),
]
"""Free-form producer context: up to 32 short string or number values."""


class _EventBase(BaseModel):
    model_config: ClassVar[ConfigDict] = ConfigDict(
        frozen=True, extra="forbid", strict=True, allow_inf_nan=False
    )

    schema_version: Literal[1] = Field(1, description="Version of this contract; always 1.")
    event_id: Id = Field(description="Unique per event; replays carry the same id.")
    user_id: Id
    item_id: Id
    ts: Timestamp = Field(description="When it happened: RFC 3339 with offset.")
    session_id: Id | None = None
    context: Context | None = None


class ClickEvent(_EventBase):
    """The user clicked an item."""

    type: Literal["click"]


class ViewEvent(_EventBase):
    """The item was shown to the user."""

    type: Literal["view"]


class DwellEvent(_EventBase):
    """The user stayed on an item for ``dwell_ms`` milliseconds."""

    type: Literal["dwell"]
    dwell_ms: Annotated[StrictInt, Field(ge=0, le=MAX_DWELL_MS)]


Event = Annotated[ClickEvent | ViewEvent | DwellEvent, Field(discriminator="type")]
"""Any clickstream event, discriminated by ``type``."""

EVENT_ADAPTER: TypeAdapter[ClickEvent | ViewEvent | DwellEvent] = TypeAdapter(Event)


def parse_event(
    raw: bytes,
    *,
    now: datetime | None = None,
    max_future: timedelta = DEFAULT_MAX_FUTURE,
) -> ClickEvent | ViewEvent | DwellEvent:
    """Decode and validate one clickstream value; raise :class:`ValidationFailed` if it is bad.

    ``now`` (default: the current time) and ``max_future`` bound how far ``ts`` may lie ahead.
    """
    if len(raw) > MAX_EVENT_BYTES:
        raise ValidationFailed(Reason.OVERSIZE, f"{len(raw)} bytes > {MAX_EVENT_BYTES}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise ValidationFailed(Reason.BAD_UTF8, f"invalid UTF-8 at byte {uexc.start}") from None
        raise ValidationFailed(Reason.BAD_JSON, str(exc)[:200]) from None
    if type(obj) is not dict:
        raise ValidationFailed(Reason.NOT_OBJECT, f"value is a JSON {type(obj).__name__}")
    version = obj.get("schema_version", _MISSING)
    if version is _MISSING:
        raise ValidationFailed(Reason.MISSING_FIELD, "schema_version is required")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise ValidationFailed(
            Reason.UNSUPPORTED_SCHEMA_VERSION, f"schema_version {version!r} is not supported"
        )
    kind = obj.get("type", _MISSING)
    if kind is _MISSING:
        raise ValidationFailed(Reason.MISSING_FIELD, "type is required")
    if kind not in EVENT_TYPES or type(kind) is not str:
        raise ValidationFailed(
            Reason.UNKNOWN_TYPE, f"type {str(kind)[:40]!r} is not one of {', '.join(EVENT_TYPES)}"
        )
    try:
        event = EVENT_ADAPTER.validate_python(obj)
    except PydanticValidationError as exc:
        raise _explain(exc) from None
    limit = (now or datetime.now(UTC)) + max_future
    if event.ts > limit:
        raise ValidationFailed(
            Reason.TS_IN_FUTURE, f"ts {event.ts.isoformat()} is after {limit.isoformat()}"
        )
    return event


_MISSING: Final = object()
_BY_ERROR: Final = {"missing": Reason.MISSING_FIELD, "extra_forbidden": Reason.EXTRA_FIELD}
_BY_FIELD: Final = {
    "ts": Reason.BAD_TS,
    "event_id": Reason.BAD_ID,
    "user_id": Reason.BAD_ID,
    "item_id": Reason.BAD_ID,
    "session_id": Reason.BAD_ID,
    "context": Reason.BAD_CONTEXT,
}


def _explain(exc: PydanticValidationError) -> ValidationFailed:
    """Map pydantic's first error to one reason code and a short message."""
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = err["loc"]
    # loc starts with the union tag ("click"/"view"/"dwell") for discriminated unions.
    path = [str(p) for p in loc[1:]] if loc and loc[0] in EVENT_TYPES else [str(p) for p in loc]
    field = path[0] if path else ""
    where = ".".join(path) or "value"
    message = f"{where}: {err['msg']}"[:200]
    if field == "dwell_ms":
        reason = Reason.DWELL_RULES
    else:
        reason = _BY_ERROR.get(err["type"]) or _BY_FIELD.get(field, Reason.BAD_FIELD)
    return ValidationFailed(reason, message)
