"""Folding clickstream events into per-user profiles: weights, the Redis script, a reference.

Weights (settings): a view counts ``weight_view`` (1), a click ``weight_click`` (2), a dwell
``weight_dwell_max`` (4) scaled linearly by ``min(dwell_ms, dwell_cap_ms) / dwell_cap_ms`` (a
dwell of two minutes or more counts as much as four views). An item's weight is split evenly over
its catalog categories to form category affinities; items without catalog entries still count as
items.

Decay: with half-life h and reference time T = the newest event ts folded for the user, an event
of weight w at ts t contributes ``w * 2 ** (-(T - t) / h)``. The sum does not depend on arrival
order, so a late event simply contributes its (smaller) decayed weight.

Exactly-once effect: each user's folded event ids are kept in its seen-set (sorted by ts) for
``profile_seen_retention_s`` of event time; an id seen before is ignored (a duplicate or a replay),
and an event older than ``T - retention`` is ignored as too late, because its id may already have
been forgotten. Both are counted, never dead-lettered: they are valid events.

:func:`reference_fold` computes the same profile in pure Python; unit tests check the formulas on
it and integration tests check the Lua script against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from recstream.keys import Keys
from schemas import ClickEvent, DwellEvent, ViewEvent
from streams.settings import StreamsSettings

AnyEvent = ClickEvent | ViewEvent | DwellEvent
LUA_SOURCE = resources.files("streams").joinpath("fold.lua").read_text("utf-8")


# The settings' own defaults (no environment read), so the fold's defaults are stated once.
_DEFAULTS = StreamsSettings.model_construct()


@dataclass(frozen=True, slots=True)
class Weights:
    """How much each kind of interaction counts, before decay."""

    view: float = _DEFAULTS.weight_view
    click: float = _DEFAULTS.weight_click
    dwell_max: float = _DEFAULTS.weight_dwell_max
    dwell_cap_ms: int = _DEFAULTS.dwell_cap_ms

    @classmethod
    def from_settings(cls, settings: StreamsSettings) -> Weights:
        return cls(
            settings.weight_view,
            settings.weight_click,
            settings.weight_dwell_max,
            settings.dwell_cap_ms,
        )

    def of(self, event: AnyEvent) -> float:
        if event.type == "view":
            return self.view
        if event.type == "click":
            return self.click
        return self.dwell_max * min(event.dwell_ms, self.dwell_cap_ms) / self.dwell_cap_ms


@dataclass(frozen=True, slots=True)
class FoldParams:
    """The profile rules the script applies (from :class:`StreamsSettings`)."""

    half_life_s: float = _DEFAULTS.profile_half_life_s
    recent_max: int = _DEFAULTS.profile_recent_max
    retention_s: float = _DEFAULTS.profile_seen_retention_s
    rebase_after_s: float = _DEFAULTS.rebase_after_s
    shift_threshold: float = _DEFAULTS.profile_shift_threshold
    seen_max: int = _DEFAULTS.profile_seen_max
    items_max: int = _DEFAULTS.profile_items_max
    categories_max: int = _DEFAULTS.profile_categories_max
    idle_ttl_s: int = _DEFAULTS.profile_idle_ttl_s
    trending_ttl_s: int = 0
    """Each item new to a profile adds to its day's recent-popularity count, kept this long
    (``streams.trending``); 0: not counted (rebuilds, tests). Set by the live worker only."""

    @classmethod
    def from_settings(cls, settings: StreamsSettings) -> FoldParams:
        return cls(
            settings.profile_half_life_s,
            settings.profile_recent_max,
            settings.profile_seen_retention_s,
            settings.rebase_after_s,
            settings.profile_shift_threshold,
            settings.profile_seen_max,
            settings.profile_items_max,
            settings.profile_categories_max,
            settings.profile_idle_ttl_s,
        )


@dataclass(frozen=True, slots=True)
class Folded:
    """One user's outcome of one batch."""

    user_id: str
    version: int
    folded: int
    duplicates: int
    late: int
    emit: bool
    shift: float
    trigger_event_id: str
    trigger_ts: float
    new_items: tuple[str, ...]
    rejected: str = ""
    """Why Redis refused the user's keys (e.g. ``WRONGTYPE``); nothing of the user was written."""
    erased: int = 0
    """Events skipped because they belong to the user's erased history (``streams.erasure``)."""

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Folded:
        def text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        if int(row[1]) < 0:
            return cls.refused(text(row[0]), text(row[7]))
        return cls(
            user_id=text(row[0]),
            version=int(row[1]),
            folded=int(row[2]),
            duplicates=int(row[3]),
            late=int(row[4]),
            emit=bool(int(row[5])),
            shift=float(text(row[6])),
            trigger_event_id=text(row[7]),
            trigger_ts=float(text(row[8])),
            new_items=tuple(text(item) for item in row[10:]),
            erased=int(row[9]),
        )

    @classmethod
    def refused(cls, user_id: str, why: str) -> Folded:
        """The outcome of a user whose keys Redis refused (its records are dead-lettered)."""
        return cls(user_id, -1, 0, 0, 0, False, 0.0, "", 0.0, (), why)


def group_by_user(
    events: Iterable[tuple[str, str, str, float, float]],
) -> dict[str, list[tuple[str, str, float, float]]]:
    """``(user, event_id, item, ts, weight)`` -> user -> events, keeping arrival order."""
    groups: dict[str, list[tuple[str, str, float, float]]] = {}
    for user, event_id, item, ts, weight in events:
        bucket = groups.get(user)
        if bucket is None:
            bucket = groups[user] = []
        bucket.append((event_id, item, ts, weight))
    return groups


PositionedEvent = tuple[str, str, float, float, int]
"""``(event_id, item, ts, weight, offset)``: an event with its clickstream offset."""


def group_positioned(
    events: Iterable[tuple[str, str, str, float, float, str, int]],
) -> tuple[dict[str, list[PositionedEvent]], dict[str, str]]:
    """``(user, event_id, item, ts, weight, field, offset)`` -> user -> events with offsets, and
    user -> its ``topic:partition`` field (the fold checks them against the erasure marker).

    A user's records share one partition (the key is the user id); should they not (the
    partition count changed), the user's first partition is checked and the offsets of another
    partition are not compared with it: those events carry no offset.
    """
    groups: dict[str, list[PositionedEvent]] = {}
    fields: dict[str, str] = {}
    for user, event_id, item, ts, weight, field_, offset in events:
        bucket = groups.get(user)
        if bucket is None:
            bucket = groups[user] = []
            fields[user] = field_
        if field_ == fields[user]:
            bucket.append((event_id, item, ts, weight, offset))
        else:
            bucket.append((event_id, item, ts, weight))  # type: ignore[arg-type]  # no offset
    return groups, fields


def script_args(
    keys: Keys,
    params: FoldParams,
    groups: Mapping[str, Sequence[tuple[Any, ...]]],
    fields: Mapping[str, str | tuple[str, int]] | None = None,
) -> list[str | bytes]:
    """ARGV of ``fold.lua``: the rules, the batch with each user's key base, the item keys.

    With ``fields`` (user -> ``topic:partition``, events carrying their offsets), the script
    skips the events of the user's erased history; a field may come with a watermark known
    from ``users.erased`` (``(field, offset)``), which counts besides the user's marker.
    """
    item_key = keys.item
    items = {event[1]: item_key(event[1]) for events in groups.values() for event in events}
    user_base = keys.user_base
    if fields:
        rows: list[tuple[Any, ...]] = []
        for user, events in groups.items():
            position = fields[user]
            if isinstance(position, tuple):
                rows.append((user, user_base(user), events, *position))
            else:
                rows.append((user, user_base(user), events, position))
        batch = orjson.dumps(rows)
    else:
        batch = orjson.dumps([(user, user_base(user), events) for user, events in groups.items()])
    return [
        keys.prefix,
        repr(params.half_life_s),
        str(params.recent_max),
        repr(params.retention_s),
        repr(params.rebase_after_s),
        repr(params.shift_threshold),
        batch,
        orjson.dumps(items),
        str(params.seen_max),
        str(params.items_max),
        str(params.categories_max),
        str(params.idle_ttl_s),
        keys.trending_base() if params.trending_ttl_s > 0 else "",
        str(params.trending_ttl_s),
    ]


@dataclass(frozen=True, slots=True)
class Progress:
    """What a fold records beside the profiles: the last three ARGV of ``fold.lua``.

    ``offsets``: per ``topic:partition`` field, the offset after the batch's last record there
    (stored in ``offsets_key``, never moving back) and the offset the worker knows Redis holds
    (-1: unknown; Redis holding less fails the fold with :data:`PROGRESS_LOST`, writing
    nothing). ``notices``: per user, the hash of its
    partition's pending change notices, its partition field, the offset of its first record in
    the batch (a refused user holds its partition's offset there) and its ``recs.origin_ts``.
    """

    offsets_key: str
    offsets: Sequence[tuple[str, int, int]]
    notices: Mapping[str, tuple[str, str, int, int | None]]

    def args(self) -> list[str | bytes]:
        return [self.offsets_key, orjson.dumps(self.offsets), orjson.dumps(self.notices)]

    def expecting(self, known: Mapping[str, int]) -> Progress:
        """The same, expecting Redis to hold ``known`` (per field) for the batch's partitions."""
        offsets = [(field, nxt, known.get(field, -1)) for field, nxt, _ in self.offsets]
        return Progress(self.offsets_key, offsets, self.notices)

    def without_offsets(self) -> Progress:
        """The same notices, no offsets (a fold of part of the batch may not move them)."""
        return Progress(self.offsets_key, (), self.notices)


NO_PROGRESS: list[str | bytes] = ["", b"[]", b"{}"]
PROGRESS_LOST = "PROGRESSLOST"
"""The start of the fold's error reply when Redis holds less progress than the worker knows."""


def pending_notice(value: bytes | str) -> tuple[int | None, Folded]:
    """A pending change notice as ``fold.lua`` keeps it: its origin timestamp and its row.

    Stored as JSON ``[version, origin_ms, row...]``: the version first, so that removing a
    delivered notice compares a prefix of the value instead of decoding it.
    """
    _, origin, *row = orjson.loads(value)
    if len(row) > 9 and not isinstance(row[9], int):
        row.insert(9, 0)  # stored before rows carried the erased count
    elif len(row) == 9:
        row.append(0)
    return (origin if isinstance(origin, int) else None), Folded.from_row(row)


class FoldScript:
    """The Lua fold, loaded once and run with EVALSHA (reloaded if Redis forgot it)."""

    def __init__(self, redis: Redis, prefix: str, params: FoldParams) -> None:
        self._redis = redis
        self._keys = Keys(prefix)
        self._params = params
        self._sha: str | None = None

    async def load(self) -> str:
        self._sha = str(await self._redis.script_load(LUA_SOURCE))
        return self._sha

    async def run(
        self,
        groups: Mapping[str, Sequence[tuple[Any, ...]]],
        progress: Progress | None = None,
        fields: Mapping[str, str | tuple[str, int]] | None = None,
    ) -> list[Folded]:
        """Fold ``groups`` (user -> events); with ``fields``, honouring erasure markers."""
        # A batch whose records were all dead-lettered folds nothing, but its offsets must still
        # be stored: the worker counts them as Redis's progress from now on.
        if not groups and (progress is None or not progress.offsets):
            return []
        sha = self._sha or await self.load()
        args = script_args(self._keys, self._params, groups, fields)
        args += NO_PROGRESS if progress is None else progress.args()
        try:
            rows = await self._redis.evalsha(sha, 0, *args)
        except NoScriptError:
            rows = await self._redis.evalsha(await self.load(), 0, *args)
        return [Folded.from_row(row) for row in rows]


@dataclass
class ReferenceProfile:
    """What :func:`reference_fold` computes: the expected stored profile, decayed to T."""

    version: int = 0
    event_count: int = 0
    reference_ts: float | None = None
    item_weights: dict[str, float] = field(default_factory=dict)
    category_affinities: dict[str, float] = field(default_factory=dict)
    recent: dict[str, float] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)
    duplicates: int = 0
    late: int = 0

    def recent_items(self, limit: int) -> list[str]:
        ranked = sorted(self.recent.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)
        return [item for item, _ in ranked[:limit]]


def reference_fold(
    batches: Iterable[Sequence[AnyEvent]],
    categories: Mapping[str, Sequence[str]],
    weights: Weights = Weights(),
    params: FoldParams = FoldParams(),
) -> ReferenceProfile:
    """Fold one user's batches the slow, obvious way (no rescaling), for tests."""
    profile = ReferenceProfile()
    contributions: list[tuple[str, float, float]] = []
    for batch in batches:
        if not batch:
            continue
        stamps = [e.ts.timestamp() for e in batch]
        newest = max(stamps if profile.reference_ts is None else [*stamps, profile.reference_ts])
        cutoff = newest - params.retention_s
        folded = 0
        for event, ts in zip(batch, stamps, strict=True):
            if ts < cutoff:
                profile.late += 1
            elif event.event_id in profile.seen:
                profile.duplicates += 1
            else:
                profile.seen[event.event_id] = ts
                contributions.append((event.item_id, ts, weights.of(event)))
                profile.recent[event.item_id] = max(ts, profile.recent.get(event.item_id, ts))
                folded += 1
        profile.seen = {k: v for k, v in profile.seen.items() if v >= cutoff}
        profile.reference_ts = newest
        if folded:
            profile.version += 1
            profile.event_count += folded
    if profile.reference_ts is None:
        return profile
    for item, ts, weight in contributions:
        decayed = weight * 2.0 ** (-(profile.reference_ts - ts) / params.half_life_s)
        profile.item_weights[item] = profile.item_weights.get(item, 0.0) + decayed
        cats = categories.get(item, ())
        for cat in cats:
            share = decayed / len(cats)
            profile.category_affinities[cat] = profile.category_affinities.get(cat, 0.0) + share
    return profile


def to_datetime(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
