"""Messages downstream of the clickstream: profile changes, recommendations, stored profiles.

``ProfileChanged`` (topic ``profiles.changed``, key = user_id) tells the regeneration consumer
that a profile moved enough to matter. ``Recommendations`` (topic ``recommendations`` and Redis
``recs:{user}``, key = user_id) is the public output contract of DESIGN.md. ``Profile`` is the
decoded view of what the stream processor keeps in Redis. ``Envelope`` is a Kafka record as read:
its metadata beside the payload, never inside it.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, NamedTuple

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from schemas.events import Id


class _Frozen(BaseModel):
    model_config: ClassVar[ConfigDict] = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False
    )


class ProfileChanges(_Frozen):
    """What changed in one update of a profile."""

    new_items: list[Id] = Field(
        default_factory=list, description="Items the user had never interacted with before."
    )
    affinity_shift: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0,
        description="Total-variation distance between the normalised category affinities now "
        "and at the last emitted change (0 = same mix, 1 = disjoint).",
    )
    events: Annotated[int, Field(ge=1)] = Field(description="Events folded by this update.")


class ProfileChanged(_Frozen):
    """A profile changed meaningfully: a new item, or an affinity shift above the threshold."""

    schema_version: Literal[1] = 1
    user_id: Id
    profile_version: Annotated[int, Field(ge=1)]
    changes: ProfileChanges
    event_id: Id = Field(description="The triggering event (the newest one folded).")
    trigger_ts: AwareDatetime = Field(description="The triggering event's ts.")


class HistoryReason(_Frozen):
    """A history item that contributed to a recommendation."""

    item_id: Id
    title: Annotated[str, Field(max_length=512)] = Field(
        "", description="The catalog's title, when the catalog has the item."
    )


MAX_REASONS = 3

POPULAR_MIN_USERS = 5
"""An item is said to be popular now only when at least this many users took it up in the
window, so a reason never shows what one or two other users did."""


class PopularNow(_Frozen):
    """Recent popularity brought an item into the list: other users took it up lately."""

    users: Annotated[int, Field(ge=POPULAR_MIN_USERS)] = Field(
        description="Users who took the item up in the window (the stream worker's counts)."
    )
    days: Annotated[int, Field(ge=1, le=366)] = Field(
        description="The window, in days, ending on the day of the user's newest events."
    )


class ScoredItem(_Frozen):
    item_id: Id
    score: float
    because: list[HistoryReason] = Field(
        default_factory=list,
        max_length=MAX_REASONS,
        description="Up to three of the user's history items that contributed most to this "
        "item, largest first (empty when the list's source cannot say: a fallback list).",
    )
    popular: PopularNow | None = Field(
        None,
        description="Set when recent popularity brought this item into the list: without it "
        "the item would not be listed (a history of a few items only).",
    )


class ModelRef(_Frozen):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    version: Annotated[str, Field(min_length=1, max_length=128)]


class Recommendations(_Frozen):
    """One user's ordered recommendations (topic ``recommendations`` and Redis ``recs:{user}``)."""

    schema_version: Literal[1] = 1
    user_id: Id
    items: list[ScoredItem] = Field(description="Best first.")
    profile_version: Annotated[int, Field(ge=0)]
    model: ModelRef
    variant: Annotated[str, Field(min_length=1, max_length=64)]
    source: Literal["model", "fallback", "refined"] = Field(
        description="model: the served model's list; fallback: popularity; refined: the model's "
        "list under the user's conversation constraints."
    )
    generated_at: AwareDatetime
    trigger_ts: AwareDatetime = Field(description="Time of the event that caused this list.")


class Profile(_Frozen):
    """A user's profile as folded by the stream processor, decayed to ``reference_ts``.

    Weights are expressed at the reference time T (the newest event ts folded): an interaction of
    weight w at time t contributes ``w * 2 ** (-(T - t) / half_life_s)``.
    """

    schema_version: Literal[1] = 1
    user_id: Id
    version: Annotated[int, Field(ge=0)] = Field(description="+1 on every change.")
    event_count: Annotated[int, Field(ge=0)] = Field(description="Distinct events folded.")
    last_event_ts: AwareDatetime = Field(description="Newest event ts folded (= reference time).")
    half_life_s: Annotated[float, Field(gt=0)]
    recent_items: list[Id] = Field(description="Distinct items, newest interaction first.")
    item_weights: dict[str, float] = Field(description="Decayed interaction weight per item.")
    category_affinities: dict[str, float] = Field(
        description="Decayed weight per catalog category (an item's weight split over its "
        "categories)."
    )

    def top_categories(self, n: int = 3) -> list[str]:
        ranked = sorted(self.category_affinities.items(), key=lambda kv: (-kv[1], kv[0]))
        return [name for name, _ in ranked[:n]]


class Envelope(NamedTuple):
    """One Kafka record as read: its metadata beside the raw payload, never inside it.

    Every reader of the clickstream (the Faust agent, batch delivery, the rebuild's
    confluent-kafka reader, tests) hands the fold these, so the fold knows no client library.
    A named tuple rather than a model: one is built per record on the hot path (a tuple builds
    about three times faster than a frozen dataclass), and nothing here needs validating (the
    payload is validated by its own contract).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    """None for a tombstone (a record with a null value)."""
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None
    """The record's Kafka timestamp (produce time, epoch milliseconds), if it has one."""
