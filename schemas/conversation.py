"""The conversation's contracts: what a refinement turn asks and answers, and the stored session.

``POST /v1/users/{user_id}/conversation`` takes a :class:`ConversationRequest` and answers a
:class:`ConversationReply`: the recommendations contract (``source: "refined"``) plus the session
id, the :class:`Constraints` understood so far and, per item, why it is there. The session
(:class:`Session`: its turns and constraints) is the one place a message is kept: one Redis key
per user, under the user's hash tag (:func:`session_key`), with a TTL; the API writes it, the
regeneration service reads its constraints, erasure deletes it. Constraints name catalog
attributes only (genres, years, catalog item ids), so whatever understood them, applying them can
only select catalog items.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from recstream.keys import Keys
from schemas.events import Id
from schemas.messages import MAX_REASONS, HistoryReason, ModelRef, PopularNow

__all__ = [
    "MAX_MESSAGE_CHARS",
    "SESSION_KIND",
    "Constraints",
    "ConversationReply",
    "ConversationRequest",
    "ExplainedItem",
    "HistoryReason",
    "Session",
    "Turn",
    "session_key",
]

SESSION_KIND = "conversation"
"""The kind of a user's session key: ``{prefix}u:{<enc>}:conversation``."""

MAX_MESSAGE_CHARS = 1000
"""Longest message a turn may carry (a refinement is a sentence, not a document)."""

SessionId = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$", description="Opaque session id.")]
Genre = Annotated[str, Field(min_length=1, max_length=64)]
Year = Annotated[int, Field(ge=1000, le=9999)]


def session_key(keys: Keys, user_id: str) -> str:
    """The Redis key of the user's session, under the user's hash tag (``Keys.user_base``)."""
    return keys.user_base(user_id) + SESSION_KIND


class _Frozen(BaseModel):
    model_config: ClassVar[ConfigDict] = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False
    )


class Constraints(_Frozen):
    """What a user asked for, in catalog attributes.

    Hard constraints select items: ``genres`` (an item has every one), ``exclude_genres`` (none),
    ``year_min``/``year_max`` (inclusive; an item without a year fails a year bound) and
    ``exclude_items``. ``like`` (catalog item ids) only reorders: items close to them in MiniLM
    space move up.
    """

    genres: tuple[Genre, ...] = ()
    exclude_genres: tuple[Genre, ...] = ()
    year_min: Year | None = None
    year_max: Year | None = None
    like: tuple[Id, ...] = Field((), max_length=5)
    exclude_items: tuple[Id, ...] = Field((), max_length=50)

    @property
    def empty(self) -> bool:
        return self == Constraints()

    @property
    def hard(self) -> bool:
        """Whether any constraint selects items (rather than only reordering them)."""
        return bool(
            self.genres
            or self.exclude_genres
            or self.year_min is not None
            or self.year_max is not None
            or self.exclude_items
        )


class Turn(_Frozen):
    """One message of the conversation, as the session keeps it."""

    role: Literal["user"] = "user"
    text: str


class Session(_Frozen):
    """A user's conversation: its turns (trimmed to the newest tokens) and the constraints."""

    schema_version: Literal[1] = 1
    session_id: SessionId
    turns: list[Turn] = Field(default_factory=list)
    constraints: Constraints = Constraints()
    updated_at: AwareDatetime


class ConversationRequest(_Frozen):
    """One refinement turn: a message, and the session it continues (a new one without)."""

    message: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)
    session_id: SessionId | None = None


class ExplainedItem(_Frozen):
    """A recommended item with its reasons: the history items behind it and the constraints it
    satisfies (as the reply's ``constraints`` name them, e.g. ``genre:Comedy``)."""

    item_id: Id
    score: float
    title: str = ""
    because: list[HistoryReason] = Field(default_factory=list, max_length=MAX_REASONS)
    popular: PopularNow | None = None
    satisfies: list[str] = Field(default_factory=list)


class ConversationReply(_Frozen):
    """The answer to a turn: the recommendations contract, refined, with the session."""

    schema_version: Literal[1] = 1
    user_id: Id
    items: list[ExplainedItem] = Field(description="Best first.")
    profile_version: Annotated[int, Field(ge=0)]
    model: ModelRef
    variant: Annotated[str, Field(min_length=1, max_length=64)]
    source: Literal["refined"] = "refined"
    generated_at: AwareDatetime
    trigger_ts: AwareDatetime
    session_id: SessionId
    constraints: Constraints
    reset: bool = Field(False, description="Whether this turn started the session over.")
