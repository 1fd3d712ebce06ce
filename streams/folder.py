"""The fold of one batch of clickstream records, as plain code that every reader feeds.

:class:`ProfileFolder` takes a batch of :class:`schemas.Envelope` records (raw key and value bytes
beside their topic, partition, offset, headers and Kafka timestamp) and:

1. validates every record from its raw bytes (:func:`schemas.parse_event`); a bad one goes to
   the dead-letter sender with its original key and bytes and headers ``dlq.reason``,
   ``dlq.detail``, ``dlq.source.topic``, ``dlq.source.partition``, ``dlq.source.offset``; a record
   whose key is not its ``user_id`` is dead-lettered too (``key_mismatch``), since per-user order
   relies on the key;
2. folds the valid events, grouped by user, with one EVALSHA of ``streams/fold.lua``;
   The events of an erased user's history (offsets below the watermarks of the user's erasure
   marker, ``streams.erasure``) are skipped there and counted as ``erased``;
3. sends a ``ProfileChanged`` for each user with a new item or a category mix shift of at least
   ``profile_shift_threshold``, with header ``recs.origin_ts``: the Kafka timestamp (epoch
   milliseconds) of the user's newest record in the batch, which the regeneration consumer passes
   on so the cache writer can measure end-to-end freshness.

The live worker's fold also counts each item new to a profile into its day's recent popularity
(``streams.trending``), in the same script.

It imports no Kafka client: the Faust agent and batch delivery (``streams/app.py``), the
rebuild's confluent-kafka reader (``ops/rebuild.py``) and tests are thin adapters that turn their
records into envelopes and give it two senders. Effects are only *queued* when :meth:`handle`
returns; the adapter acks or checkpoints the batch after that.

**Durable progress** (the live worker, constructed with its consumer group): the fold script also
stores, atomically with the profiles, each partition's next offset (``Keys.stream_offsets``) and
the change notices it decided (``Keys.pending_changes``, per partition, user -> notice). A notice
is removed once Kafka confirms it (only if no newer one replaced it); :meth:`ProfileFolder.resume`
tells the consumer where each assigned partition resumes and announces the pending notices again.
Dead letters are flushed before the next fold stores offsets past their records, so a stored
offset never passes a record whose outcome could still be lost.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Protocol, TypeVar, cast

import orjson
from redis.asyncio import Redis
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from recstream.keys import Keys
from recstream.metrics import count
from schemas import Envelope, Reason, ValidationFailed, parse_event
from schemas.deadletter import dead_letter_headers
from streams import metrics
from streams.exceptions import StoreUnavailable, StreamsError
from streams.fold import (
    PROGRESS_LOST,
    Folded,
    FoldParams,
    FoldScript,
    PositionedEvent,
    Progress,
    Weights,
    group_positioned,
    pending_notice,
    to_datetime,
)
from streams.metrics import ORIGIN_HEADER
from streams.settings import StreamsSettings
from streams.trending import DAY_S

__all__ = ["BatchHook", "ProfileFolder", "Send"]

log = logging.getLogger(__name__)

SERVICE = "streams"
"""The service label of ``recs_records_total``
(``in = folded + duplicate + dead_lettered + erased``)."""

# Dead-letter reasons of records refused before or by the store (the contract's own reasons
# are schemas.Reason, for values that fail validation).
TOMBSTONE = "tombstone"
MISSING_KEY = "missing_key"
STORE_REJECTED = "store_rejected"

# Redis replies that say "not now" rather than "never": out of memory under noeviction, loading
# its data set, a replica without its master or promoted meanwhile, a cluster slot migrating or
# down, busy with a script. They are retried like an unreachable Redis; any other reply is a
# refusal of the data itself. (redis-py turns the known prefixes into classes and strips them.)
TRANSIENT_ERRORS = (
    OutOfMemoryError,
    ReadOnlyError,
    MasterDownError,
    TryAgainError,
    ClusterDownError,
)
TRANSIENT_PREFIXES = ("BUSY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "OOM")


def transient(exc: ResponseError) -> bool:
    """Whether a Redis refusal is a passing state of the server (retry) rather than of the data."""
    return isinstance(exc, TRANSIENT_ERRORS) or str(exc).startswith(TRANSIENT_PREFIXES)


def reply_class(exc: ResponseError) -> str:
    """The class of a Redis refusal (``WRONGTYPE``, ``NoPermissionError``…), never its message."""
    if type(exc) is not ResponseError:
        return type(exc).__name__
    head = str(exc).split(" ", 1)[0]
    return head if head.isalpha() and head.isupper() else "ResponseError"


BatchHook = Callable[[int, Sequence[float], Sequence[Folded]], None]
"""Called after each batch with (records, per-event latencies in seconds, per-user results)."""


class Send(Protocol):
    """Queues one record for a topic (the dead-letter topic or ``profiles.changed``)."""

    def __call__(
        self, *, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
    ) -> Awaitable[object]: ...


class ProfileFolder:
    """Validates, dead-letters, folds and announces one batch of clickstream records."""

    def __init__(
        self,
        settings: StreamsSettings,
        redis: Redis,
        send_dlq: Send,
        send_changed: Send,
        *,
        group: str | None = None,
        erasures: Callable[[], Awaitable[Mapping[str, Mapping[str, int]]]] | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        params = FoldParams.from_settings(settings)
        if group is not None:
            # Recent popularity (streams.trending) is the live worker's: a rebuild refolds
            # history that was counted when it was live.
            params = replace(params, trending_ttl_s=settings.streams_trending_keep_days * DAY_S)
        self.script = FoldScript(redis, settings.key_prefix, params)
        self._counts_trending = params.trending_ttl_s > 0
        self.weights = Weights.from_settings(settings)
        self.max_future = timedelta(seconds=settings.event_max_future_s)
        self._send_dlq = send_dlq
        self._send_changed = send_changed
        self._out_changed = metrics.EVENTS_OUT.labels(settings.topic_profiles_changed)
        self._out_dlq = metrics.EVENTS_OUT.labels(settings.topic_dlq)
        self.hooks: list[BatchHook] = []
        # Durable progress (module docstring), kept only for a consumer group (the live worker).
        self.group = group
        keys = Keys(settings.key_prefix)
        self._offsets_key = keys.stream_offsets(group) if group is not None else ""
        self._pending_key = _memo(lambda tp: keys.pending_changes(group or "", tp[0], tp[1]))
        self._field_of = _memo(_field)
        self._forget = redis.register_script(FORGET_DELIVERED_LUA)
        self._unflushed: list[Awaitable[object]] = []
        self._forgetting: set[asyncio.Future[None]] = set()
        # Per partition field, the offset this worker knows Redis holds (read on assignment or
        # stored by its own folds since); whether the latest fold moved the stored offsets.
        self._known: dict[str, int] = {}
        self._offsets_moved = False
        self._resumes = 0
        # Completion of the latest batch's fold: batches may be validated concurrently, but
        # they are folded and announced strictly in the order handle() was called.
        self._last_fold: asyncio.Future[None] | None = None
        # Erased users' watermarks (user -> 'topic:partition' -> offset) as users.erased held
        # them at the latest assignment: the fold takes the higher of these and the user's
        # marker in Redis, so a Redis that lost markers (restored older) still skips the history.
        self._load_erasures = erasures
        self.erased: Mapping[str, Mapping[str, int]] = {}

    async def handle(
        self, records: Sequence[Envelope], arrived: Sequence[float | None] | None = None
    ) -> None:
        """Process one batch of records; effects are queued when it returns.

        ``arrived`` is each record's arrival time in the reader (``time.monotonic()``), for the
        per-event fold latency; records without one count from the start of this call.
        Calls may overlap (batch delivery validates the next poll while Redis folds the
        previous one); folds and announcements still happen in call order.
        """
        previous, mine = self._last_fold, asyncio.get_running_loop().create_future()
        self._last_fold = mine
        try:
            await self._handle(records, arrived, previous)
        finally:
            mine.set_result(None)

    async def _handle(
        self,
        records: Sequence[Envelope],
        arrived: Sequence[float | None] | None,
        previous: asyncio.Future[None] | None,
    ) -> None:
        started = time.monotonic()
        valid: list[tuple[str, str, str, float, float, str, int]] = []
        valid_records: list[Envelope] = []
        # Per user, the Kafka timestamp of its newest record (records of a user come in order).
        produced: dict[str, int | None] = {}
        weight_of = self.weights.of
        field_of = self._field_of
        topic = records[0].topic if records else ""
        dead = 0
        # Everything is checked here, before anything reaches Redis: a record the fold could
        # not finish (a ts before 1970 has no datetime for its change notice) is refused whole.
        for record in records:
            try:
                if record.value is None:
                    raise _Refused(TOMBSTONE, "null value (tombstone)")
                event = parse_event(record.value, max_future=self.max_future)
                if record.key is None:
                    raise _Refused(MISSING_KEY, "record has no key; it must be the user_id")
                if record.key != event.user_id.encode():
                    raise ValidationFailed(
                        Reason.KEY_MISMATCH, "record key must equal the event's user_id"
                    )
                ts = event.ts.timestamp()
                if ts < 0:
                    detail = f"ts {event.ts.isoformat()} is before 1970"
                    raise ValidationFailed(Reason.BAD_TS, detail)
            except ValidationFailed as failure:
                await self._dead_letter(record, failure.reason.value, failure.detail)
                dead += 1
                continue
            except _Refused as early:
                await self._dead_letter(record, early.reason, early.detail)
                dead += 1
                continue
            stamp = record.timestamp_ms
            produced[event.user_id] = stamp if type(stamp) is int and stamp >= 0 else None
            valid.append(
                (
                    event.user_id,
                    event.event_id,
                    event.item_id,
                    ts,
                    weight_of(event),
                    field_of((record.topic, record.partition)),
                    record.offset,
                )
            )
            valid_records.append(record)
        metrics.EVENTS_IN.labels(topic).inc(len(records))
        progress = None
        if self.group is not None:
            # Built while the previous batch folds; what Redis holds is known only after it.
            progress = self._progress(records, valid, valid_records, produced)
        if previous is not None:
            await previous
        if progress is not None:
            progress = progress.expecting(self._known)
            await self._flush_dead_letters()
        groups, fields = group_positioned(valid)
        folded = await self._fold(groups, progress, self._watermarks(fields))
        if progress is not None and self._offsets_moved:
            self._remember_offsets(progress, folded)
        if self.settings.streams_fault_kill_before_announce and any(r.emit for r in folded):
            log.critical("fault injection: SIGKILL after the fold, before announcing")
            os.kill(os.getpid(), signal.SIGKILL)
        refused = {r.user_id: r.rejected for r in folded if r.rejected}
        if refused:
            for (user, *_), record in zip(valid, valid_records, strict=True):
                if user in refused:
                    detail = f"Redis refused the user's keys: {refused[user]}"
                    await self._dead_letter(record, STORE_REJECTED, detail)
                    dead += 1
        # Counted together once every record has its outcome, so in = folded + duplicate +
        # dead_lettered + erased holds whenever no batch is inside this method.
        count(SERVICE, topic, "in", len(records))
        count(SERVICE, topic, "dead_lettered", dead)
        count(SERVICE, topic, "folded", sum(r.folded for r in folded))
        count(SERVICE, topic, "duplicate", sum(r.duplicates + r.late for r in folded))
        count(SERVICE, topic, "erased", sum(r.erased for r in folded))
        announced = 0
        sent: list[tuple[str, Folded, object]] = []
        for result in folded:
            if result.emit:
                delivery = await self._announce(result, produced.get(result.user_id))
                announced += 1
                if progress is not None:
                    sent.append((progress.notices[result.user_id][0], result, delivery))
        if announced:
            self._out_changed.inc(announced)
        if sent:
            self._forget_when_delivered(sent)
        done = time.monotonic()
        if arrived is None:
            latencies = [done - started] * len(records)
        else:
            latencies = [done - (t or started) for t in arrived]
        metrics.observe_many(metrics.FOLD_SECONDS, latencies)
        metrics.BATCH_SIZE.observe(len(records))
        for hook in self.hooks:
            hook(len(records), latencies, folded)

    async def _dead_letter(self, record: Envelope, reason: str, detail: str) -> object:
        metrics.DEAD_LETTERED.labels(reason).inc()
        self._out_dlq.inc()
        headers = dead_letter_headers(record, reason, detail)
        # A tombstone has no bytes: its dead letter is empty, and its reason says why.
        value = b"" if record.value is None else record.value
        sent = await self._send_dlq(key=record.key, value=value, headers=headers)
        if self.group is not None and inspect.isawaitable(sent):
            self._unflushed.append(sent)
        return sent

    async def _announce(self, result: Folded, produced_ms: int | None) -> object:
        # Built as a plain dict (a ProfileChanged in JSON form; a unit test holds it to the
        # model): validating a model per change costs more than the fold of its events.
        change = {
            "schema_version": 1,
            "user_id": result.user_id,
            "profile_version": result.version,
            "changes": {
                "new_items": list(result.new_items),
                "affinity_shift": min(result.shift, 1.0),
                "events": result.folded,
            },
            "event_id": result.trigger_event_id,
            "trigger_ts": to_datetime(result.trigger_ts).isoformat(),
        }
        metrics.PROFILE_CHANGES.inc()
        headers = None if produced_ms is None else [(ORIGIN_HEADER, b"%d" % produced_ms)]
        return await self._send_changed(
            key=result.user_id.encode(), value=orjson.dumps(change), headers=headers
        )

    async def _fold(
        self,
        groups: dict[str, list[PositionedEvent]],
        progress: Progress | None = None,
        fields: Mapping[str, str | tuple[str, int]] | None = None,
    ) -> list[Folded]:
        """Run the fold script; retry while Redis is briefly unavailable, isolate refused users.

        An unreachable Redis or a transient refusal (:func:`transient`) is retried with
        backoff for ``streams_redis_retry_s``, then raises :class:`StoreUnavailable`: the worker
        stops without acking, so the batch comes again. Any other refusal concerns the data: the
        batch is folded user by user, and the users Redis still refuses come back as
        :meth:`Folded.refused` (their records are dead-lettered), the others fold.
        """
        deadline = time.monotonic() + self.settings.streams_redis_retry_s
        delay = 0.1
        self._offsets_moved = progress is not None
        while True:
            try:
                results = await self.script.run(groups, progress, fields)
            except (RedisConnectionError, RedisTimeoutError, ResponseError) as exc:
                if isinstance(exc, ResponseError) and str(exc).startswith(PROGRESS_LOST):
                    # Redis came back older while this worker ran: folding on would leave the
                    # gap unfolded. A new worker resumes from the offsets Redis holds.
                    raise StoreUnavailable(f"Redis lost progress: {exc}") from exc
                if isinstance(exc, ResponseError) and not transient(exc):
                    self._offsets_moved = False
                    results = await self._fold_each(groups, progress, fields)
                    break
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"Redis unavailable for {self.settings.streams_redis_retry_s:.0f}s: "
                        f"{reply_class(exc) if isinstance(exc, ResponseError) else exc}"
                    ) from exc
                log.warning("Redis unavailable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            break
        for result in results:
            metrics.FOLDED.inc(result.folded)
            if self._counts_trending and result.new_items:
                metrics.TRENDING_COUNTED.inc(len(result.new_items))
            if result.duplicates:
                metrics.IGNORED.labels("duplicate").inc(result.duplicates)
            if result.late:
                metrics.IGNORED.labels("too_late").inc(result.late)
            if result.erased:
                metrics.IGNORED.labels("erased").inc(result.erased)
        return results

    async def _fold_each(
        self,
        groups: dict[str, list[PositionedEvent]],
        progress: Progress | None = None,
        fields: Mapping[str, str | tuple[str, int]] | None = None,
    ) -> list[Folded]:
        """Fold each user alone, so one user's refused data cannot hold back the others'.

        Each user's change notice is kept pending as usual, but no offset moves: a fold of part
        of the batch does not account for all of it (the next batch's fold moves them on).

        A transient or connection error here propagates to :meth:`_fold`'s caller unretried
        (StoreUnavailable semantics are kept by re-raising it as such).
        """
        results: list[Folded] = []
        for user, events in groups.items():
            try:
                notices_only = None if progress is None else progress.without_offsets()
                results.extend(await self.script.run({user: events}, notices_only, fields))
            except ResponseError as exc:
                if transient(exc):
                    raise StoreUnavailable(f"Redis unavailable: {reply_class(exc)}") from exc
                # No user id in logs (personal data): the dead letter names the record.
                log.error("Redis refused a user's fold (dead-lettered): %s", reply_class(exc))
                results.append(Folded.refused(user, reply_class(exc)))
            except (RedisConnectionError, RedisTimeoutError) as exc:
                raise StoreUnavailable(f"Redis unreachable: {exc}") from exc
        return results

    def _watermarks(self, fields: dict[str, str]) -> Mapping[str, str | tuple[str, int]]:
        """Each user's partition field, with the watermark users.erased gives it if any."""
        erased = self.erased
        if not erased:
            return fields
        out: dict[str, str | tuple[str, int]] = dict(fields)
        for user, field in fields.items():
            marks = erased.get(user)
            if marks is not None and field in marks:
                out[user] = (field, marks[field])
        return out

    # Durable progress: offsets and pending change notices in Redis, beside the profiles.

    def _progress(
        self,
        records: Sequence[Envelope],
        valid: Sequence[tuple[str, str, str, float, float, str, int]],
        valid_records: Sequence[Envelope],
        produced: Mapping[str, int | None],
    ) -> Progress:
        """The offsets and notice keys the fold of this batch records beside the profiles."""
        ends: dict[tuple[str, int], int] = {}
        for record in records:
            tp = (record.topic, record.partition)
            if record.offset >= ends.get(tp, -1):
                ends[tp] = record.offset
        notices: dict[str, tuple[str, str, int, int | None]] = {}
        for row, record in zip(valid, valid_records, strict=True):
            user = row[0]
            if user not in notices:
                tp = (record.topic, record.partition)
                notices[user] = (self._pending_key(tp), _field(tp), record.offset, produced[user])
        offsets = [(_field(tp), end + 1, -1) for tp, end in ends.items()]
        return Progress(self._offsets_key, offsets, notices)

    def _remember_offsets(self, progress: Progress, folded: Sequence[Folded]) -> None:
        """What the fold just stored (as fold.lua computes it): ``next``, held at refused users."""
        held: dict[str, int] = {}
        for result in folded:
            if result.rejected:
                _, field, first, _ = progress.notices[result.user_id]
                held[field] = min(first, held.get(field, first))
        known = self._known
        for field, next_offset, _ in progress.offsets:
            stored = min(next_offset, held.get(field, next_offset))
            if stored > known.get(field, -1):
                known[field] = stored

    async def _flush_dead_letters(self) -> None:
        """Wait until Kafka has every dead letter sent so far.

        The fold about to run stores offsets past the records these letters stand for; once
        stored, those records are never read again, so their letters must not be lost. Dead
        letters are rare, and a batch without any waits for nothing.
        """
        if self._unflushed:
            waiting, self._unflushed = self._unflushed, []
            await asyncio.gather(*waiting)

    def _forget_when_delivered(self, sent: Sequence[tuple[str, Folded, object]]) -> None:
        """Once Kafka has these notices, remove them from their pending hashes (in the background).

        A notice is removed only if its pending entry still holds the same profile version, so a
        newer notice decided meanwhile stays. A notice whose delivery or removal fails stays
        pending and is announced again on the partition's next assignment (harmless: notices
        carry the profile version).
        """
        # A sender that returns no delivery to wait for cannot confirm anything: those stay.
        sent = [entry for entry in sent if inspect.isawaitable(entry[2])]
        if not sent:
            return
        task = asyncio.ensure_future(self._forget_delivered(sent))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    async def _forget_delivered(self, sent: Sequence[tuple[str, Folded, object]]) -> None:
        deliveries = [cast(Awaitable[object], d) for _, _, d in sent]
        entries = [(key, result.user_id, result.version) for key, result, _ in sent]
        try:
            await asyncio.gather(*deliveries)
            await self._forget(args=[orjson.dumps(entries)])
        # Broad on purpose: a background clean-up with no caller to report to; what it could
        # not do stays pending and is redone (see _forget_when_delivered).
        except Exception as exc:
            log.warning("%d change notices stay pending: %r", len(entries), exc)

    async def check_progress(self) -> None:
        """Raise :class:`StoreUnavailable` if Redis holds less progress than this worker stored.

        The fold script makes the same check, but only for the partitions of its batch: this
        catches a Redis that came back older when no record arrives for a partition (the end of
        a burst). An unreachable Redis is left to the fold's own retries.
        """
        known, resumes = dict(self._known), self._resumes
        if not known or not self._offsets_key:
            return
        try:
            stored = await self.redis.hmget(self._offsets_key, list(known))
        except (RedisConnectionError, RedisTimeoutError):
            return
        if resumes != self._resumes:
            return  # the worker re-read Redis meanwhile: ``known`` is from before
        for (field, offset), value in zip(known.items(), stored, strict=True):
            if value is None or int(value) < offset:
                raise StoreUnavailable(
                    f"Redis lost progress: {field} holds {value and int(value)}, expected {offset}"
                )

    async def resume(
        self, committed: Mapping[tuple[str, int], int | None]
    ) -> dict[tuple[str, int], int | None]:
        """Where assigned clickstream partitions resume; their pending notices are re-announced.

        ``committed``: the group's Kafka commit of each assigned partition (None: none). Returns
        per partition the offset stored in Redis by the fold, or None (read from the earliest
        retained offset) when Redis has none but Kafka has a commit: Redis came back empty or
        without this partition, so the records since the start are folded again (those Redis
        still has are duplicates). A partition with neither is left to Kafka's own
        ``auto_offset_reset``. Called on every assignment, before consuming starts.
        """
        tps = sorted(tp for tp in committed if tp[0] == self.settings.topic_clickstream)
        if self.group is None or not tps:
            return {}
        if self._load_erasures is not None:
            try:
                self.erased = await self._load_erasures()
            except StreamsError as exc:  # the markers in Redis still hold; the map is a backup
                log.warning(
                    "users.erased not read (%s); keeping the %d known", exc, len(self.erased)
                )
        stored = await self._retrying(
            "reading stored offsets",
            lambda: self.redis.hmget(self._offsets_key, [_field(tp) for tp in tps]),
        )
        plan: dict[tuple[str, int], int | None] = {}
        self._known = {}
        self._resumes += 1
        for tp, value in zip(tps, stored, strict=True):
            if value is not None:
                plan[tp] = self._known[_field(tp)] = int(value)
                if plan[tp] != committed[tp]:
                    log.info(
                        "%s: resuming at stored offset %d (Kafka: %s)",
                        _field(tp),
                        plan[tp],
                        committed[tp],
                    )
            elif committed[tp]:
                log.warning(
                    "%s: Redis has no offset but Kafka has %s: folding again from the "
                    "earliest retained record",
                    _field(tp),
                    committed[tp],
                )
                plan[tp] = None
        await self._announce_pending(tps)
        return plan

    async def _announce_pending(self, tps: Sequence[tuple[str, int]]) -> None:
        """Announce again every notice still pending for these partitions."""
        sent: list[tuple[str, Folded, object]] = []
        for tp in tps:
            key = self._pending_key(tp)
            entries = await self._retrying(
                "reading pending notices", partial(self.redis.hgetall, key)
            )
            for value in entries.values():
                origin, result = pending_notice(value)
                sent.append((key, result, await self._announce(result, origin)))
        if sent:
            log.info("announcing %d pending change notices again", len(sent))
            self._out_changed.inc(len(sent))
            self._forget_when_delivered(sent)

    async def _retrying(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, retried while Redis is unreachable, for ``streams_redis_retry_s``."""
        deadline = time.monotonic() + self.settings.streams_redis_retry_s
        delay = 0.1
        while True:
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(f"{what}: Redis unreachable: {exc}") from exc
                log.warning("%s: Redis unavailable (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


_T = TypeVar("_T")

# Removes delivered notices from their pending hashes, each only if it still holds the version
# that was delivered. ARGV[1]: JSON [[pending_key, user_id, version], ...]; a pending value is
# JSON [version, origin_ms, user_id, version, ...] (fold.lua), so '[<version>,' starts it.
FORGET_DELIVERED_LUA = """
local removed = 0
for _, entry in ipairs(cjson.decode(ARGV[1])) do
  local value = redis.call('HGET', entry[1], entry[2])
  local head = string.format('[%d,', entry[3])
  if value and string.sub(value, 1, #head) == head then
    redis.call('HDEL', entry[1], entry[2])
    removed = removed + 1
  end
end
return removed
"""


def _field(tp: tuple[str, int]) -> str:
    """A partition's field in the stored offsets: ``topic:partition``."""
    return f"{tp[0]}:{tp[1]}"


def _memo(build: Callable[[tuple[str, int]], str]) -> Callable[[tuple[str, int]], str]:
    """``build`` with its answers kept (one key per partition, built once)."""
    cache: dict[tuple[str, int], str] = {}

    def cached(tp: tuple[str, int]) -> str:
        key = cache.get(tp)
        if key is None:
            key = cache[tp] = build(tp)
        return key

    return cached


class _Refused(Exception):  # noqa: N818 - a signal inside the validation loop, never raised out
    """A record refused before validation of its value could start (no value, no key)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
