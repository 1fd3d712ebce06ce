"""Reading an internal topic's record into its contract, or refusing it with a stable reason.

Both consumers read records other processes wrote (``profiles.changed``, ``recommendations``).
A record they cannot use goes to the topic's dead-letter topic with its original key and bytes and
:func:`schemas.deadletter.dead_letter_headers`, whose ``dlq.reason`` is a :class:`DeadReason`:
nothing is dropped silently, and an operator can replay the record once its cause is fixed.

:func:`decode` is the one gate: size, tombstone, UTF-8, JSON, object, contract, key = user_id.
Checks that need Redis (a version ahead of the stored profile) are the services' own.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, TypeVar

import orjson
from confluent_kafka import Message
from pydantic import BaseModel, ValidationError

from consumers.exceptions import ConsumerError
from schemas import Envelope

__all__ = ["DeadReason", "RecordRefusedError", "decode", "envelope"]

Model = TypeVar("Model", bound=BaseModel)

_ID_FIELDS = frozenset({"user_id", "item_id", "event_id"})


class DeadReason(StrEnum):
    """The ``dlq.reason`` codes of the internal topics' dead letters (stable: operators filter)."""

    OVERSIZE = "oversize"
    TOMBSTONE = "tombstone"
    BAD_UTF8 = "bad_utf8"
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    SCHEMA_VERSION = "schema_version"
    MISSING_FIELD = "missing_field"
    EXTRA_FIELD = "extra_field"
    BAD_ID = "bad_id"
    INVALID_FIELD = "invalid_field"
    KEY_MISMATCH = "key_mismatch"
    NO_PROFILE = "no_profile"
    VERSION_AHEAD = "version_ahead"


class RecordRefusedError(ConsumerError):
    """A record that cannot be used: its dead letter's reason and a short detail."""

    def __init__(self, reason: DeadReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def envelope(message: Message) -> Envelope:
    """A polled data message as the shared record envelope (raw key, bytes and headers)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    ts = message.timestamp()[1]
    raw = message.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    headers = tuple(
        (name, value.encode() if isinstance(value, str) else value or b"") for name, value in pairs
    )
    return Envelope(
        topic, partition, offset, message.key(), message.value() or b"", headers, ts or None
    )


def decode(model: type[Model], key: bytes | None, value: bytes | None, max_bytes: int) -> Model:
    """``value`` as ``model`` (a message keyed by its ``user_id``); else RecordRefusedError."""
    if value is None:
        raise RecordRefusedError(DeadReason.TOMBSTONE, "a record without a value")
    if len(value) > max_bytes:
        raise RecordRefusedError(DeadReason.OVERSIZE, f"{len(value)} bytes > {max_bytes}")
    try:
        parsed = model.model_validate_json(value)
    except ValidationError as exc:
        raise _diagnose(value, exc) from None
    user_id: str = getattr(parsed, "user_id")  # noqa: B009  # every keyed internal message has one
    if key != user_id.encode():
        raise RecordRefusedError(DeadReason.KEY_MISMATCH, f"key {key!r} is not user_id {user_id!r}")
    return parsed


def _diagnose(value: bytes, exc: ValidationError) -> RecordRefusedError:
    """Why the contract refused ``value``: the first problem, most basic first."""
    reason, detail = _unreadable(value) or _off_contract(exc)
    return RecordRefusedError(reason, detail)


def _unreadable(value: bytes) -> tuple[DeadReason, str] | None:
    try:
        document: Any = orjson.loads(value.decode("utf-8"))
    except UnicodeDecodeError as err:
        return DeadReason.BAD_UTF8, str(err)
    except orjson.JSONDecodeError as err:
        return DeadReason.BAD_JSON, str(err)
    if not isinstance(document, dict):
        return DeadReason.NOT_AN_OBJECT, f"a JSON {type(document).__name__}"
    return None


def _off_contract(exc: ValidationError) -> tuple[DeadReason, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    detail = ".".join(str(part) for part in first["loc"]) + ": " + first["msg"]
    if any(e["loc"][:1] == ("schema_version",) for e in errors):
        reason = DeadReason.SCHEMA_VERSION
    elif first["type"] == "missing":
        reason = DeadReason.MISSING_FIELD
    elif first["type"] == "extra_forbidden":
        reason = DeadReason.EXTRA_FIELD
    elif any(str(part) in _ID_FIELDS for part in first["loc"]):
        reason = DeadReason.BAD_ID
    else:
        reason = DeadReason.INVALID_FIELD
    return reason, detail
