"""``POST /v1/users/{user_id}/conversation``: a refinement turn of the user's list.

The route reads the user's session (Redis, ``schemas.conversation.session_key``), understands the
message (:class:`inference.conversation.RuleParser`), folds it into the session's constraints,
ranks every unseen catalog item with the served artifact for the user's stored history (a
history short enough gets recent popularity blended in, as the regeneration service does:
:class:`RecentWindows`), keeps what meets the constraints (:func:`inference.conversation.refine`),
explains each item (:func:`inference.reasons.occlusion_reasons`, and ``popular`` where recent
popularity brought it in), and writes the session back with its TTL, its turns
trimmed to the newest 1024 tokens. The regeneration service reads the same session, so the
constraints keep steering the list the user's new events regenerate while the session lives.

The models (the artifact, MiniLM, SmolLM2's tokenizer) load once when the app starts, in a
thread; every turn's model work runs on one worker thread, never on the event loop. A message is
kept nowhere but in the session, and logs carry neither it nor the user id.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio
from pydantic import ValidationError

from api.metrics import TRENDING_FAILURES
from consumers.regenerate import model_history
from inference.conversation import (
    CatalogAttributes,
    Parsed,
    RuleParser,
    describe,
    load_tokenizer,
    merge,
    parse_session,
    refine,
    trim_turns,
)
from inference.reasons import ListReasons, occlusion_reasons
from recstream.keys import Keys
from schemas import ModelRef, PopularNow
from schemas.conversation import (
    Constraints,
    ConversationReply,
    ConversationRequest,
    ExplainedItem,
    HistoryReason,
    Session,
    Turn,
    session_key,
)
from streams.profile import read_profile_async
from streams.trending import DAY_S, Window, day_of, read_counts

__all__ = [
    "MAX_CONVERSATION_BODY",
    "ConversationEngine",
    "RecentWindows",
    "Refusal",
    "TurnRefused",
    "load_attributes",
    "parse_request",
    "run_turn",
]

log = logging.getLogger(__name__)

MAX_CONVERSATION_BODY = 8 * 1024
"""Largest body a turn may send (bytes): a message of at most 1000 characters and a session id."""


@dataclass(frozen=True)
class Refusal:
    """A 4xx answer: status, code, message."""

    status: int
    code: str
    message: str


class TurnRefused(Exception):  # noqa: N818 - an answer to send, not a failure of the service
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.message)
        self.refusal = refusal


def parse_request(body: bytes) -> ConversationRequest:
    """The turn a body asks for, or :class:`TurnRefused` (400) saying what is wrong, never echoing
    the body."""
    try:
        request = ConversationRequest.model_validate_json(body)
    except ValidationError as exc:
        fields = sorted({".".join(str(p) for p in e["loc"]) or "body" for e in exc.errors()})
        raise TurnRefused(
            Refusal(400, "bad_request", f"invalid conversation request: {', '.join(fields)}"[:256])
        ) from None
    if any((ord(c) < 32 and c not in "\t\n\r") or 0x7F <= ord(c) <= 0x9F for c in request.message):
        raise TurnRefused(
            Refusal(400, "bad_message", "the message may not hold control characters")
        )
    if not request.message.strip():
        raise TurnRefused(Refusal(400, "bad_message", "the message is empty"))
    return request


@dataclass(frozen=True)
class TurnResult:
    session: Session
    items: list[ExplainedItem]
    reset: bool


class ConversationEngine:
    """The models a turn needs, loaded once; :meth:`turn` is the whole turn minus Redis."""

    def __init__(
        self,
        recommender: Any,
        attributes: CatalogAttributes,
        parser: RuleParser,
        tokenizer: Any,
        vectors: Any,
    ) -> None:
        self.recommender = recommender
        self.attributes = attributes
        self.parser = parser
        self.tokenizer = tokenizer
        self._vectors = vectors  # ItemIndex: item ids -> unit MiniLM vectors
        self.model = ModelRef(name=recommender.name, version=recommender.version)
        self._recent: dict[str, int] | None = None  # the counts the model holds

    @classmethod
    def load(cls, folder: Path, attributes: CatalogAttributes) -> ConversationEngine:
        """Verify and load the artifact and the packaged models (seconds; call it in a thread)."""
        from inference.artifact import load_recommender, read_item_index
        from inference.embeddings import default_encoder

        recommender = load_recommender(folder)
        index = read_item_index(folder)
        # Only items the model ranks and the catalog describes can be refined into a list.
        served = set(recommender.item_ids) & set(index.item_ids)
        attributes = CatalogAttributes(
            item for item_id, item in attributes.items.items() if item_id in served
        )
        parser = RuleParser(attributes, default_encoder(), index)
        return cls(recommender, attributes, parser, load_tokenizer(), index)

    def vectors(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.asarray(self._vectors.vectors(item_ids), dtype=np.float32)

    @property
    def recent_days(self) -> int:
        """The model's window of recent popularity, in days (0: it blends none)."""
        days: int = self.recommender.recent_days
        return days

    def blends_recent(self, history: list[str], returning: bool = False) -> bool:
        """Whether this history's list gets recent popularity blended in (when counts exist);
        ``returning``: its user has been away as long as the blend asks (:meth:`returning`)."""
        known = len(self.recommender.to_indices(history))
        applies: bool = self.recommender.trending.applies(known, returning)
        return applies

    def returning(self, newest: datetime, now: datetime) -> bool:
        """Whether a user whose newest event is ``newest`` has been away long enough at ``now``
        for a blend served to returning users only (``TrendingConfig.idle_s``)."""
        idle = self.recommender.trending.idle_s
        return bool(idle) and (now - newest).total_seconds() >= idle

    def popular(
        self,
        history: list[str],
        constraints: Constraints,
        listed: list[str],
        k: int,
        returning: bool = False,
    ) -> dict[str, PopularNow]:
        """The items of a refined list that recent popularity brought into it: those that the
        same refinement of the ranking without the counts does not list, of those enough users
        took up (``ArtifactRecommender.popular``'s rule, for a refined list). Runs a second
        ranking, for a history the blend applies to only."""
        counts = self._recent
        users = self.recommender.recent_users(listed)
        if counts is None or not users or not self.blends_recent(history, returning):
            return {}
        self.use_recent(None)
        try:
            ranked = self.ranked(history, returning)
            before = refine(ranked, constraints, self.attributes, k, self.vectors)
        finally:
            self.use_recent(counts)
        kept = {item for item, _ in before}
        brought = {item: n for item, n in users.items() if item not in kept}
        return ListReasons({}, brought, self.recent_days).popular_now()

    def understand(self, message: str) -> Parsed:
        return self.parser.parse(message)

    def ranked(self, history: list[str], returning: bool = False) -> list[tuple[str, float]]:
        """Every unseen item the model ranks, best first (``returning``: for a user who has
        been away, :meth:`returning`)."""
        ranked: list[tuple[str, float]] = self.recommender.recommend(
            [history], self.recommender.n_items, returning=[returning]
        )[0]
        return ranked

    def use_recent(self, counts: dict[str, int] | None) -> None:
        """The recent-popularity counts the next turns rank with (``None``: none), handed to the
        model only when they are not the ones it holds. Call it on the model's thread, with the
        turn it is for."""
        if counts is not self._recent:
            self.recommender.use_recent(counts)
            self._recent = counts

    def turn(
        self,
        history: list[str],
        previous: Session | None,
        message: str,
        k: int,
        now: datetime,
        *,
        recent: dict[str, int] | None = None,
        returning: bool = False,
    ) -> TurnResult:
        parsed = self.understand(message)
        before = previous.constraints if previous is not None else Constraints()
        constraints = merge(before, parsed)
        self.use_recent(recent)
        ranked = self.ranked(history, returning)
        listed = refine(ranked, constraints, self.attributes, k, self.vectors)
        ids = [i for i, _ in listed]
        reasons = occlusion_reasons(self.recommender, history, ids)
        popular = self.popular(history, constraints, ids, k, returning)
        items = [
            ExplainedItem(
                item_id=item,
                score=score,
                title=self.attributes.title(item),
                because=[
                    HistoryReason(item_id=h, title=self.attributes.title(h))
                    for h in reasons.get(item, [])
                ],
                popular=popular.get(item),
                satisfies=describe(constraints, self.attributes, item),
            )
            for item, score in listed
        ]
        turns = [*(previous.turns if previous is not None else []), Turn(text=message)]
        session = Session(
            session_id=previous.session_id if previous is not None else secrets.token_hex(16),
            turns=trim_turns(turns, self.tokenizer),
            constraints=constraints,
            updated_at=now,
        )
        return TurnResult(session, items, parsed.reset)


class RecentWindows:
    """Recent popularity for conversation turns, as the regeneration service blends it into the
    lists of short histories (``consumers.regenerate.RecentCounts``, ``inference.trending``).

    A turn's window is the model's ``days`` ending on the day of the user's newest event (the
    day the stream worker counted it by; a time more than a day past the wall clock is not
    believed), summed from the per-day hashes (``streams.trending``). A window's newest two
    days are read again after ``refresh_s``, older ones after ``settled_s``
    (``streams.trending.Window``); the ``keep`` windows asked last are kept. When Redis cannot
    answer, what was read before stays (none if nothing was) and the failure is counted; when
    the ACL refuses the counts (a deployment that predates them), they are not asked again and
    turns rank without them.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        days: int,
        *,
        refresh_s: float = 5.0,
        settled_s: float = 600.0,
        keep: int = 4,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.client, self.keys, self.days = client, keys, days
        self.refresh_s, self.settled_s, self.keep = refresh_s, settled_s, keep
        self.clock, self.wall = clock, wall
        self._windows: OrderedDict[int, Window] = OrderedDict()  # by last day
        self.refused = False

    async def counts(self, newest: datetime) -> dict[str, int] | None:
        """The counts per item id of the window ending on ``newest``'s day (the same object
        while none of its days changed); ``None`` when there are none to give."""
        if self.refused or self.days <= 0:
            return None
        last = day_of(min(newest.timestamp(), self.wall() + DAY_S))
        window = self._windows.get(last)
        if window is None:
            window = Window(self.days, refresh_s=self.refresh_s, settled_s=self.settled_s)
            window.move(last)
            self._windows[last] = window
            while len(self._windows) > self.keep:
                self._windows.popitem(last=False)
        self._windows.move_to_end(last)
        now = self.clock()
        due = window.due(now)
        if due:
            pipe = self.client.pipeline(transaction=False)
            for day in due:
                pipe.hgetall(self.keys.trending(day))
            try:
                raw = await pipe.execute()
            except redis.exceptions.NoPermissionError:
                log.warning("recent popularity is not read: this principal may not read its counts")
                self.refused = True
                return None
            except redis.RedisError as exc:
                TRENDING_FAILURES.inc()
                log.warning("recent-popularity counts unavailable, the last ones stay: %s", exc)
                return window.counts()
            for day, fields in zip(due, raw, strict=True):
                window.put(day, read_counts(fields), now)
        return window.counts()


async def load_attributes(client: redis.asyncio.Redis, keys: Keys) -> CatalogAttributes:
    """The catalog ``catalog load`` stored (``catalog:items`` and each ``item:<id>`` hash)."""
    reply = await client.smembers(keys.catalog())
    members = sorted(m.decode() if isinstance(m, bytes) else str(m) for m in reply)
    pipe = client.pipeline(transaction=False)
    for item_id in members:
        pipe.hgetall(keys.item(item_id))
    hashes = await pipe.execute()
    return CatalogAttributes.from_hashes(dict(zip(members, hashes, strict=True)))


async def run_turn(
    engine: ConversationEngine,
    executor: ThreadPoolExecutor,
    client: redis.asyncio.Redis,
    *,
    keys: Keys,
    user_id: str,
    request: ConversationRequest,
    k: int,
    ttl_s: int,
    variant: str,
    recent: RecentWindows | None = None,
) -> ConversationReply:
    """One turn on the store: read the session and profile (and, for a history short enough,
    the recent-popularity counts of ``recent``), refine, write the session back."""
    key = session_key(keys, user_id)
    raw = await client.get(key)
    previous = parse_session(raw)
    if raw is not None and previous is None:
        log.warning("a stored conversation session did not parse; it is started over")
    if request.session_id is not None and (
        previous is None or previous.session_id != request.session_id
    ):
        raise TurnRefused(
            Refusal(404, "unknown_session", "no such session (it expired or was never started)")
        )
    if request.session_id is None:
        previous = None  # a turn without a session id starts a new one
    profile = await read_profile_async(client, keys, user_id)
    history = model_history(profile) if profile is not None else []
    now = datetime.now(UTC)
    # A user away as long as a returning users' blend asks gets the counts of now; any other
    # the window of their newest event, as the regeneration service made their list.
    back = profile is not None and engine.returning(profile.last_event_ts, now)
    counts = None
    if recent is not None and profile is not None and engine.blends_recent(history, back):
        counts = await recent.counts(now if back else profile.last_event_ts)
    turn = partial(engine.turn, recent=counts, returning=back)
    result = await asyncio.get_running_loop().run_in_executor(
        executor, turn, history, previous, request.message, k, now
    )
    await client.set(key, result.session.model_dump_json(), ex=ttl_s)
    return ConversationReply(
        user_id=user_id,
        items=result.items,
        profile_version=profile.version if profile is not None else 0,
        model=engine.model,
        variant=variant,
        generated_at=datetime.now(UTC),
        trigger_ts=now,
        session_id=result.session.session_id,
        constraints=result.session.constraints,
        reset=result.reset,
    )
