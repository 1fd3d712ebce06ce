"""The read API's own contracts: its error envelope, health, scopes and the API-key record.

The API's main body is :class:`~schemas.messages.Recommendations`, the same contract the cache
holds; these models cover the rest, so every response the API sends, and the OpenAPI document
that describes it (:mod:`schemas.openapi`), come from models in this package. ``POST /v1/events``
takes one clickstream event (:data:`~schemas.events.Event`) or an :class:`EventBatch`; it answers
:class:`EventsAccepted`, or :class:`EventsRejected` naming each invalid event by its index and
reason code only. An
:class:`ApiKeyRecord` is one line of the keys file that ``recstream api keys add`` writes and the
API reads: the key's SHA-256, never the key.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, ClassVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import Event, Id
from schemas.exceptions import Reason

__all__ = [
    "ApiKeyRecord",
    "ErrorBody",
    "ErrorResponse",
    "EventBatch",
    "EventsAccepted",
    "EventsRejected",
    "Health",
    "InvalidEvent",
    "Scope",
]


class _Body(BaseModel):
    model_config: ClassVar[ConfigDict] = ConfigDict(frozen=True, extra="forbid")


class ErrorBody(_Body):
    """What went wrong: a stable code for programs, a sentence for people."""

    code: Annotated[str, Field(pattern=r"^[a-z0-9_]+$", max_length=64)] = Field(
        description="Stable and machine-friendly: `bad_user_id`, `bad_k`, `unauthorized` (no "
        "valid key), `forbidden` (the key lacks the route's scope), `unavailable`, `internal`, "
        "`bad_body`, `too_many_events`, `body_too_large`, `invalid_events`, "
        "`ingestion_unavailable`, `ingestion_failed`, `erasure_unavailable`, `erasure_failed`, "
        "or the HTTP reason in snake case (`not_found`, `method_not_allowed`)."
    )
    message: Annotated[str, Field(max_length=256)]


class ErrorResponse(_Body):
    """The body of every 4xx and 5xx answer."""

    error: ErrorBody

    @classmethod
    def of(cls, code: str, message: str) -> ErrorResponse:
        return cls(error=ErrorBody(code=code, message=message))


class InvalidEvent(_Body):
    """One event a batch was refused for: where it stands and why, never what it holds."""

    index: Annotated[int, Field(ge=0)] = Field(
        description="Position in `events` (0 for a body that is a single event)."
    )
    reason: Reason = Field(
        description="The reason code the stream worker would dead-letter it with."
    )


class EventsRejected(_Body):
    """A batch refused because some of its events break the clickstream contract; nothing of it
    was produced."""

    error: ErrorBody
    invalid: Annotated[tuple[InvalidEvent, ...], Field(min_length=1)]


class EventBatch(_Body):
    """Several clickstream events in one request (a deployment bounds how many)."""

    events: Annotated[list[Event], Field(min_length=1)]


class EventsAccepted(_Body):
    """Every event of the request was acknowledged by Kafka on the clickstream topic."""

    accepted: Annotated[int, Field(ge=1)]


class Health(_Body):
    """Whether the service can answer reads (it is up and its store answered), and nothing more:
    an open probe must not tell a caller what the service depends on."""

    ok: bool


class Scope(StrEnum):
    """A right an API key may hold; :data:`schemas.openapi.SCOPES` names each route's."""

    READ = "read"  # read users' recommendations (and future read routes)
    EVENTS = "events"  # send clickstream events (POST /v1/events)
    ADMIN = "admin"  # operator routes: erasure and export of a user's data
    CONVERSE = "converse"  # refine a user's list in words (POST .../conversation; writes a session)


def _sorted_scopes(scopes: tuple[Scope, ...]) -> tuple[Scope, ...]:
    return tuple(sorted(set(scopes)))


class ApiKeyRecord(_Body):
    """One API key as the keys file stores it (one JSON object per line).

    Keys are random 256-bit secrets, so one SHA-256 of the whole key is enough to store them:
    nobody can search that space, and a slow password hash would only add latency to every read.
    """

    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{12}$")] = Field(
        description="The key's public part; the key is `rs_<key_id>_<secret>`."
    )
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = Field(
        description="Hex SHA-256 of the whole key (UTF-8)."
    )
    scopes: Annotated[tuple[Scope, ...], AfterValidator(_sorted_scopes), Field(min_length=1)]
    name: Id = Field(description="Who or what holds the key, for operators.")
    created_at: AwareDatetime
    expires_at: AwareDatetime | None = None

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at
