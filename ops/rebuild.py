"""Rebuild every profile from the clickstream's history into a fresh Redis namespace, then switch.

**Rebuild.** The records of ``clickstream`` from the beginning (or from a time, via
offsets-for-times) up to the end offsets captured when the rebuild starts are read in batches and
handed, as :class:`schemas.Envelope` records, to :class:`streams.ProfileFolder`, the live agent's
own batch handler: the same validation, weights and Lua fold (``streams/fold.lua``), only with the
namespace's key prefix (``{prefix}ns:{name}:``), no dead-lettering (the live agent did that) and
no ``profiles.changed`` announcements. The fold reads item categories under its prefix, so the
catalog's ``item:*`` hashes are copied into the namespace first.

**Erasures.** Before folding, every record of ``users.erased`` (read from its start: the topic
is compacted) is written as an erasure marker into the namespace, and into the live keys before
the tail is folded there (``streams.erasure``): the fold skips an erased user's events below the
marker's offsets, so a rebuild from offset 0 brings no erased history back; an erased user's
later events make a new profile. An erasure during a rebuild marks the namespace itself.

**Checkpoints.** After each batch the next offset of every partition in it is written to the
namespace's ``replay:state`` hash; an interrupted rebuild started again with the same namespace
resumes from there (a batch folded but not yet checkpointed is folded again, and the seen-sets
make that a no-op).

**Switch** (``ops/switch.lua``, one EVAL, so readers see all old or all new profiles): each
rebuilt user's profile keys and seen-set are RENAMEd over the live ones, and a rebuilt version
that is not above the live one becomes live + 1 (versions never go back, so caches accept the
lists regenerated from it). A live user absent from the rebuild is deleted only if the rebuild
could have seen its events: when every partition was read from offset 0, or when the user's
newest event is after the *horizon*, the time of the first record read from a partition whose
head was not read (retention, ``delete_records`` or ``--from-time``). What a rebuild cannot
see, it keeps (:meth:`ProfileRebuild.horizon`). The script is
O(users + size of the replaced profiles): Redis serves nothing else while it runs. Measured here
on ML-100K profiles (943 users, 300k events, ``bench/replay.py``) it took about 50 ms into an
empty live namespace and 90-130 ms replacing all 943 profiles (freeing the replaced hashes;
``lazyfree-lazy-server-del yes`` moves that off the main thread); for millions of users run the
switch when traffic is low. The live agent keeps folding meanwhile, so after the switch the
*tail* (from the captured end offsets to the new end) is folded into the live profiles: events
the live agent folded into the old profiles are applied to the new ones, and any event folded
twice is ignored by its seen-set entry. Then the namespace's leftovers are deleted.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Message
from redis.typing import EncodableT, FieldT
from tqdm import tqdm

from ops.exceptions import ReplayError
from ops.settings import OpsSettings
from ops.topics import PartitionRange, TopicReader
from recstream import security
from recstream.keys import Keys
from recstream.settings import CommonSettings
from schemas import Envelope
from streams import ProfileFolder
from streams.fold import Folded
from streams.settings import StreamsSettings

__all__ = ["NAMESPACE_RE", "ProfileRebuild", "RebuildPlan", "RebuildStats", "SwitchResult"]

NAMESPACE_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
SWITCH_LUA = resources.files("ops").joinpath("switch.lua").read_text("utf-8")
BEGINNING = "beginning"


@dataclass(frozen=True)
class RebuildPlan:
    """What a rebuild reads: the full ranges, what is left of them, and its phase."""

    namespace: str
    prefix: str
    topic: str
    start: str  # "beginning" or an RFC 3339 time
    ranges: tuple[PartitionRange, ...]
    remaining: tuple[PartitionRange, ...]
    phase: str  # new | folding | folded | switched

    @property
    def total(self) -> int:
        return sum(r.count for r in self.ranges)

    @property
    def left(self) -> int:
        return sum(r.count for r in self.remaining)

    def describe(self) -> list[str]:
        """Human-readable lines: the namespace, the phase, and per-partition offsets."""
        lines = [
            f"topic {self.topic} from {self.start}; namespace {self.namespace!r} "
            f"(key prefix {self.prefix!r}); phase {self.phase}",
            f"{'partition':>9} {'start':>10} {'end':>10} {'records':>9} {'left':>9}",
        ]
        for full, left in zip(self.ranges, self.remaining, strict=True):
            lines.append(
                f"{full.partition:>9} {full.start:>10} {full.end:>10} {full.count:>9} "
                f"{left.count:>9}"
            )
        lines.append(f"{'total':>9} {'':>10} {'':>10} {self.total:>9} {self.left:>9}")
        return lines


@dataclass
class RebuildStats:
    """Counts of one fold pass (rebuild or tail)."""

    records: int = 0
    folded: int = 0
    duplicates: int = 0
    late: int = 0
    erased: int = 0
    invalid: Counter[str] = field(default_factory=Counter)
    users: set[str] = field(default_factory=set)

    def add(self, results: Iterable[Folded]) -> None:
        for result in results:
            self.folded += result.folded
            self.duplicates += result.duplicates
            self.late += result.late
            self.erased += result.erased
            if result.folded or result.duplicates or result.late or not result.erased:
                self.users.add(result.user_id)  # not a user whose every event was erased

    def describe(self) -> str:
        bad = ", ".join(f"{reason} {n}" for reason, n in sorted(self.invalid.items())) or "none"
        return (
            f"{self.records} records: {self.folded} events folded for {len(self.users)} users, "
            f"{self.duplicates} duplicates, {self.late} too late, {self.erased} of erased users, "
            f"invalid: {bad}"
        )


@dataclass(frozen=True)
class SwitchResult:
    switched: int
    removed: int  # live users absent from a rebuild that saw all their history
    kept: int  # live users absent from the rebuild whose events it could not see
    versions_bumped: int
    script_s: float  # how long the atomic switch held Redis (0 when resumed after it)
    tail: RebuildStats


def envelope(message: Message) -> Envelope:
    """A confluent-kafka record as the fold's envelope (the rebuild's adapter)."""
    kind, ms = message.timestamp()
    # A consumed record's headers are a list of pairs; the stub also allows the producer's forms.
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return Envelope(
        message.topic() or "",
        message.partition() or 0,
        message.offset() or 0,
        message.key(),
        message.value() or b"",
        tuple(
            (name, value.encode() if isinstance(value, str) else value or b"")
            for name, value in pairs
        ),
        ms if kind != TIMESTAMP_NOT_AVAILABLE else None,
    )


# The keys that make up one user's profile, the hash (version, ref_ts) first; the switch moves
# them together. Built here by Keys, never in Lua from a raw id.
PROFILE_PARTS: tuple[Callable[[Keys, str], str], ...] = (
    Keys.profile,
    Keys.profile_items,
    Keys.profile_categories,
    Keys.profile_recent,
    Keys.seen,
)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ProfileRebuild:
    """One named rebuild: plan, fold (resumable), switch. Holds a Redis client; close it."""

    def __init__(
        self,
        settings: OpsSettings,
        namespace: str,
        *,
        streams: StreamsSettings | None = None,
        topic: str | None = None,
        progress: bool = True,
    ) -> None:
        if not NAMESPACE_RE.match(namespace):
            raise ReplayError(f"namespace {namespace!r}: use 1-64 letters, digits, '.', '_' or '-'")
        self.settings = settings
        self.namespace = namespace
        self.topic = topic or settings.topic_clickstream
        self.live = Keys(settings.key_prefix)
        self.target = self.live.namespace(namespace)
        self.state_key = self.target.replay_state()
        self.progress = progress
        # The fold must run with the live agent's rules; addresses and names come from ours.
        common = settings.model_dump(include=set(CommonSettings.model_fields))
        self.streams = (streams or StreamsSettings()).model_copy(update=common)
        self.redis = security.redis_client(settings)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> ProfileRebuild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- planning ----------------------------------------------------------------------------

    def plan(self, since: datetime | None = None, from_beginning: bool = False) -> RebuildPlan:
        """The rebuild's ranges: from the namespace's checkpoint if it has one, else new.

        ``since`` and ``from_beginning`` choose the start of a new rebuild (default: the
        beginning); resuming with a different start is refused.
        """
        requested = since.astimezone(UTC).isoformat() if since is not None else None
        if from_beginning:
            requested = BEGINNING
        state = {_text(k): _text(v) for k, v in self.redis.hgetall(self.state_key).items()}
        if state:
            if state.get("topic") != self.topic:
                raise ReplayError(
                    f"namespace {self.namespace!r} holds a rebuild of {state.get('topic')!r}"
                )
            if requested is not None and requested != state["start"]:
                raise ReplayError(
                    f"namespace {self.namespace!r} holds a rebuild from {state['start']}; "
                    "resume it without a start option or choose another namespace"
                )
            parts = sorted(int(k.split(":", 1)[1]) for k in state if k.startswith("end:"))
            ranges = tuple(
                PartitionRange(p, int(state[f"start:{p}"]), int(state[f"end:{p}"])) for p in parts
            )
            remaining = tuple(
                PartitionRange(p, min(int(state[f"next:{p}"]), r.end), r.end)
                for p, r in zip(parts, ranges, strict=True)
            )
            return RebuildPlan(
                self.namespace,
                self.target.prefix,
                self.topic,
                state["start"],
                ranges,
                remaining,
                state["phase"],
            )
        with TopicReader(self.settings, self.topic) as reader:
            planned = tuple(reader.plan(since=since if not from_beginning else None))
        return RebuildPlan(
            self.namespace,
            self.target.prefix,
            self.topic,
            requested or BEGINNING,
            planned,
            planned,
            "new",
        )

    def live_users(self) -> set[str]:
        return self._users(self.live)

    def rebuilt_users(self) -> set[str]:
        return self._users(self.target)

    def _users(self, keys: Keys) -> set[str]:
        # Every profile has a seen-set (its newest event id is always retained), and seen keys
        # have no suffixes, so they name the users unambiguously.
        return {
            keys.user_of(key)
            for key in self.redis.scan_iter(match=keys.user_pattern("seen"), count=1000)
        }

    # -- folding -----------------------------------------------------------------------------

    def run(
        self, plan: RebuildPlan, after_batch: Callable[[RebuildStats], None] | None = None
    ) -> RebuildStats:
        """Fold what is left of ``plan`` into the namespace, checkpointing after each batch."""
        if plan.phase == "switched":
            raise ReplayError(f"namespace {self.namespace!r} was already switched live")
        if plan.phase == "new":
            fields: dict[FieldT, EncodableT] = {
                "phase": "folding",
                "topic": self.topic,
                "start": plan.start,
                "created_at": datetime.now(UTC).isoformat(),
            }
            for r in plan.ranges:
                fields.update(
                    {f"start:{r.partition}": str(r.start), f"end:{r.partition}": str(r.end)}
                )
                fields[f"next:{r.partition}"] = str(r.start)
            self.redis.hset(self.state_key, mapping=fields)
        # After the state hash exists: an erasure from now on marks this namespace itself.
        self.honour_erasures(self.target)
        self._copy_catalog()
        stats = self._fold(self.target, list(plan.remaining), True, "rebuild", after_batch)
        self.redis.hset(self.state_key, "phase", "folded")
        return stats

    def honour_erasures(self, keys: Keys) -> int:
        """Write the marker of every erased user (``users.erased``, read from its start) under
        ``keys``, so the fold skips their erased history; returns how many."""
        from streams.erasure import read_erasures, restore_markers

        erasures = read_erasures(
            security.kafka_config(self.settings), self.settings.topic_users_erased
        )
        return restore_markers(self.redis, keys, erasures.values())

    def _copy_catalog(self) -> int:
        """Copy the live catalog's item hashes into the namespace (the fold reads categories)."""
        ids = [_text(i) for i in self.redis.smembers(self.live.catalog())]
        for start in range(0, len(ids), 1000):
            pipe = self.redis.pipeline(transaction=False)
            for item in ids[start : start + 1000]:
                pipe.copy(self.live.item(item), self.target.item(item), replace=True)
            pipe.execute()
        return len(ids)

    def _fold(
        self,
        keys: Keys,
        ranges: list[PartitionRange],
        checkpoint: bool,
        label: str,
        after_batch: Callable[[RebuildStats], None] | None = None,
    ) -> RebuildStats:
        stats = RebuildStats()
        settings = self.streams.model_copy(update={"key_prefix": keys.prefix})
        client = security.async_redis_client(self.settings)

        async def send_dlq(
            *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
        ) -> None:
            # Already dead-lettered by the live agent: counted here, not sent again.
            reason = dict(headers or ()).get("dlq.reason", b"unknown")
            stats.invalid[_text(reason)] += 1

        async def send_changed(
            *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
        ) -> None:
            return None  # a rebuild announces nothing: the switch bumps versions instead

        folder = ProfileFolder(settings, client, send_dlq, send_changed)
        folder.hooks.append(lambda _n, _lat, results: stats.add(results))
        total = sum(r.count for r in ranges)
        bar = tqdm(
            total=total,
            desc=label,
            unit="ev",
            file=sys.stderr,
            disable=not self.progress or total == 0,
            dynamic_ncols=True,
        )
        with (
            bar,
            asyncio.Runner() as runner,
            TopicReader(self.settings, self.topic) as reader,
        ):
            try:
                for batch in reader.read(
                    ranges, self.settings.replay_batch_size, self.settings.replay_idle_timeout_s
                ):
                    runner.run(folder.handle([envelope(m) for m in batch]))
                    if checkpoint:
                        self._checkpoint(batch)
                    stats.records += len(batch)
                    bar.update(len(batch))
                    if after_batch is not None:
                        after_batch(stats)
            finally:
                runner.run(client.aclose())
        return stats

    def _checkpoint(self, batch: list[Message]) -> None:
        """Store the next offset of each partition in ``batch``, and the time of the first
        record the rebuild read from it (the switch's horizon; kept from the first batch on)."""
        nxt: dict[FieldT, EncodableT] = {}
        first: dict[int, int] = {}
        for m in batch:
            partition = m.partition() or 0
            nxt[f"next:{partition}"] = (m.offset() or 0) + 1
            kind, ms = m.timestamp()
            if partition not in first and kind != TIMESTAMP_NOT_AVAILABLE:
                first[partition] = ms
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.state_key, mapping=nxt)
        for partition, ms in first.items():
            pipe.hsetnx(self.state_key, f"first_ms:{partition}", ms)
        pipe.execute()

    # -- switching ---------------------------------------------------------------------------

    def horizon(self, plan: RebuildPlan) -> float | None:
        """Epoch seconds before which the rebuild cannot see a user's events; None when it read
        every partition's whole history (then a live user absent from it had no events there).

        A partition read from offset 0 holds all its history. One read from a later offset (the
        retention or ``delete_records`` removed its head, or the rebuild started ``--from-time``)
        saw nothing before the time of its first record read; one with nothing left to read saw
        nothing at all. The horizon is the latest of those times, because a user's partition is
        not known here: whatever partition held a user's events, a last event before the horizon
        may have been in the part the rebuild did not read. Events carry their own ``ts``, which
        may run ahead of the record's time by up to ``event_max_future_s`` (the validator's
        bound), so that slack is added too.
        """
        incomplete = [r for r in plan.ranges if r.start > 0]
        if not incomplete:
            return None
        state = {_text(k): _text(v) for k, v in self.redis.hgetall(self.state_key).items()}
        newest = 0.0
        for r in incomplete:
            first = state.get(f"first_ms:{r.partition}")
            if r.count == 0 or first is None:
                return float("inf")  # nothing read there: everything before now is unseen
            newest = max(newest, int(first) / 1000)
        return newest + self.streams.event_max_future_s

    def switch(self, plan: RebuildPlan) -> SwitchResult:
        """Make the rebuilt profiles the live ones, fold the tail, delete the namespace."""
        if plan.phase not in ("folded", "switched"):
            raise ReplayError(f"namespace {self.namespace!r} is not fully rebuilt yet")
        switched = removed = kept = bumped = 0
        script_s = 0.0
        if plan.phase == "folded":
            rebuilt = sorted(self.rebuilt_users())
            stale = sorted(self.live_users() - set(rebuilt))
            if not rebuilt and stale:
                raise ReplayError(
                    f"the rebuild holds no profiles; switching would delete {len(stale)} live "
                    "profiles, refused"
                )
            horizon = self.horizon(plan)
            keys = [self.state_key]
            for user in rebuilt:
                keys += [
                    *self._profile_keys(self.target, user),
                    *self._profile_keys(self.live, user),
                ]
            for user in stale:
                keys += self._profile_keys(self.live, user)
            started = time.perf_counter()
            reply = self.redis.eval(
                SWITCH_LUA,
                len(keys),
                *keys,
                len(rebuilt),
                len(PROFILE_PARTS),
                "none" if horizon is None else repr(horizon),
            )
            script_s = time.perf_counter() - started
            switched, removed, kept, bumped = (int(x) for x in reply)
        tail = [
            PartitionRange(r.partition, r.end, high) for r, high in self._tail_ends(plan.ranges)
        ]
        self.honour_erasures(self.live)
        tail_stats = self._fold(self.live, tail, False, "tail")
        self._drop_namespace()
        return SwitchResult(switched, removed, kept, bumped, script_s, tail_stats)

    @staticmethod
    def _profile_keys(keys: Keys, user: str) -> list[str]:
        return [part(keys, user) for part in PROFILE_PARTS]

    def _tail_ends(self, ranges: Iterable[PartitionRange]) -> list[tuple[PartitionRange, int]]:
        with TopicReader(self.settings, self.topic) as reader:
            marks = reader.watermarks()
        return [(r, max(r.end, marks.get(r.partition, (0, r.end))[1])) for r in ranges]

    def _drop_namespace(self) -> int:
        pattern = _glob_escape(self.target.prefix) + "*"
        keys = list(self.redis.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            self.redis.delete(*keys[start : start + 1000])
        return len(keys)

    def drop(self) -> int:
        """Delete the namespace (an abandoned rebuild); returns the number of keys deleted."""
        return self._drop_namespace()
