"""Erasure (GDPR art. 17) and access (art. 15) of one user's data, and the markers folds honour.

**Erasing** a user (:func:`erase_user`; ``recstream users erase``, ``DELETE /v1/users/{id}``):

1. read the end offset of every clickstream partition: the user's events below them are the
   history being erased, the ones at or above them are new;
2. publish a :class:`schemas.UserErased` record (key = user id) on the compacted ``users.erased``
   topic and wait for Kafka's ack, before anything is deleted: every rebuild and replay reads it;
3. one Lua script in the user's hash slot deletes every key of the user under every prefix (the
   live keys, the conversation session (``schemas.conversation.session_key``: it holds the
   user's own words), rebuild namespaces, their checkpoints: a SCAN of ``*u:{<escaped id>}:*`` found
   them; all share the user's hash tag, hence one slot) and writes the user's *erasure marker*
   (``Keys.erased``: ``topic:partition`` -> watermark) in the live namespace and in every rebuild
   in progress, atomically: a fold that runs after it skips the erased history
   (``streams/fold.lua``), one that ran before it had its keys deleted;
4. a second SCAN deletes what a rebuild folded between the first SCAN and the script, and the
   user's change notices still pending in the stream worker's hashes are removed, and the user
   is taken out of the returning users' schedule (``Keys.returning``; a regeneration that read
   the profile just before may put them back, and the service drops them when they come due and
   have no profile).

Erasing twice, or a user nobody knows, is harmless: the second record has later watermarks and
deletes nothing. New events after the erasure start a new profile. The keyed output topics
(``profiles.changed``, ``recommendations``, ``profiles.embeddings``) get no tombstones: they are
delete-policy topics with bounded retention (``docs/privacy.md``), and their consumers refuse the
user's in-flight messages anyway (the cache writer writes no list for a user without a profile).

**Access** (:func:`export_user`; ``recstream users export``): every key of the user in a
namespace, decoded, as one JSON-ready dict.

**Honouring erasures elsewhere**: :func:`read_erasures` reads the whole ``users.erased`` topic;
:func:`restore_markers` writes its records as markers into a namespace (a rebuild does that
before folding, so a rebuild from offset 0 does not bring an erased user back).

Clients are given by the caller (the principal that may erase is the caller's choice); nothing
here reads the environment.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from pydantic import TypeAdapter, ValidationError

from recstream import security
from recstream.kafka import idempotent_producer, transient
from recstream.keys import Keys
from recstream.settings import CommonSettings
from schemas.conversation import SESSION_KIND, session_key
from schemas.erasure import ErasureReceipt, StoredKey, UserErased, UserExport
from schemas.events import Id
from streams.exceptions import ErasureFailed
from streams.metrics import ERASURES_REFUSED

__all__ = [
    "ERASER",
    "Eraser",
    "ErasureReport",
    "clickstream_watermarks",
    "erase_user",
    "export_user",
    "read_erasures",
    "restore_markers",
]

# KEYS[1..m]: erasure markers to write (one per namespace that folds); KEYS[m+1..]: keys to
# delete. ARGV: m, JSON {field: watermark}, erased_at_ms. Watermarks only move forward, so an
# older record restored after a newer erasure changes nothing. Returns the keys deleted.
ERASE_LUA = """
local m = tonumber(ARGV[1])
local marks = cjson.decode(ARGV[2])
local deleted = {}
for i = m + 1, #KEYS do
  if redis.call('DEL', KEYS[i]) == 1 then
    deleted[#deleted + 1] = KEYS[i]
  end
end
for i = 1, m do
  for field, mark in pairs(marks) do
    local old = tonumber(redis.call('HGET', KEYS[i], field))
    if old == nil or mark > old then
      redis.call('HSET', KEYS[i], field, string.format('%d', mark))
    end
  end
  local at = tonumber(redis.call('HGET', KEYS[i], 'erased_at_ms'))
  if at == nil or tonumber(ARGV[3]) > at then
    redis.call('HSET', KEYS[i], 'erased_at_ms', ARGV[3])
  end
end
return deleted
"""

log = logging.getLogger(__name__)

_SCAN_COUNT = 1000
_ID: TypeAdapter[str] = TypeAdapter(Id)
ERASER = "eraser"
"""The principal that erases (``recstream.security``): it may delete any user's keys."""


@dataclass(frozen=True)
class ErasureReport:
    """What one erasure did."""

    record: UserErased
    deleted: list[str] = field(default_factory=list)
    """Every key deleted, in every namespace."""
    marked: list[str] = field(default_factory=list)
    """The key prefixes (namespaces) where an erasure marker was written."""
    pending_removed: int = 0
    """Change notices of the user removed from the stream worker's pending hashes."""
    unscheduled: bool = False
    """Whether the user was taken out of the returning users' schedule (``consumers.returning``)."""

    def receipt(self) -> ErasureReceipt:
        return ErasureReceipt(
            user_id=self.record.user_id,
            erased_at_ms=self.record.erased_at_ms,
            topic=self.record.topic,
            watermarks=self.record.watermarks,
            deleted_keys=len(self.deleted),
            namespaces=sorted({_prefix_of(k) for k in self.deleted}),
            marked=self.marked,
            pending_notices_removed=self.pending_removed,
        )


def clickstream_watermarks(
    kafka: Mapping[str, Any], topic: str, timeout_s: float = 10.0
) -> dict[int, int]:
    """Partition -> high watermark (the next offset to be written) of ``topic``, now.

    ``kafka``: librdkafka connection settings (bootstrap servers and credentials).
    """
    consumer = _reader(kafka)
    try:
        return _highs(consumer, topic, timeout_s)
    finally:
        consumer.close()


def erase_user(
    client: redis.Redis,
    producer: Producer,
    kafka: Mapping[str, Any],
    *,
    user_id: str,
    prefix: str,
    clickstream: str,
    erased_topic: str,
    timeout_s: float = 30.0,
) -> ErasureReport:
    """Erase every key of ``user_id`` under every prefix and record it (module docstring).

    ``client``: Redis, as a principal that may delete any key and SCAN; ``producer``: an
    idempotent producer allowed to write ``erased_topic``; ``kafka``: connection settings to
    read the clickstream's end offsets. Raises :class:`ErasureFailed` before deleting anything
    when Kafka does not take the record.
    """
    if not _valid_id(user_id):
        # No event can carry such an id (schemas.events.Id), so no key holds one.
        raise ErasureFailed("a user id is 1-64 characters, no control characters")
    marks = clickstream_watermarks(kafka, clickstream, timeout_s)
    record = UserErased(
        user_id=user_id,
        erased_at_ms=int(time.time() * 1000),
        topic=clickstream,
        watermarks=marks,
    )
    _publish(producer, erased_topic, user_id, record.model_dump_json().encode(), timeout_s)

    live = Keys(prefix)
    prefixes = [prefix, *_rebuild_prefixes(client, live)]
    markers = [Keys(p).erased(user_id) for p in prefixes]
    pattern = live.user_match_nested(user_id)
    script = client.register_script(ERASE_LUA)
    deleted: set[str] = set()
    # Twice: what a rebuild folded between the first SCAN and the script (before its namespace
    # had a marker) is found by the second; after the script no fold can create more.
    for _ in range(2):
        found = {_text(k) for k in client.scan_iter(match=pattern, count=_SCAN_COUNT)}
        named = {*live.user_keys(user_id), live.privacy_ledger(user_id), session_key(live, user_id)}
        gone = sorted({*named, *found} - {*markers})
        reply = script(
            keys=[*markers, *gone],
            args=[len(markers), orjson.dumps(record.fields()), record.erased_at_ms],
        )
        deleted.update(_text(k) for k in reply)
    pending = _forget_pending(client, live, user_id)
    unscheduled = bool(client.zrem(live.returning(), user_id))
    return ErasureReport(record, sorted(deleted), prefixes, pending, unscheduled)


def export_user(client: redis.Redis, keys: Keys, user_id: str) -> UserExport:
    """Everything stored about ``user_id`` under ``keys``' prefix, decoded (GDPR art. 15).

    Covers every key of the user (the fold's kinds, the cached list, the privacy ledger, the
    erasure marker, and any other kind a SCAN finds under the user's hash tag) and the change
    notices still pending for the user.
    """
    base = keys.user_base(user_id)
    names = {k: base + k for k in ("profile", "items", "cats", "recent", "seen", "recs")}
    names["privacy"] = keys.privacy_ledger(user_id)
    names["erased"] = keys.erased(user_id)
    names[SESSION_KIND] = session_key(keys, user_id)
    for key in client.scan_iter(match=_glob(base) + "*", count=_SCAN_COUNT):
        names.setdefault(_text(key)[len(base) :], _text(key))
    stored: dict[str, StoredKey] = {}
    for kind, key in names.items():
        value = _read_key(client, key)
        if value is not None:
            ttl = int(client.ttl(key))
            stored[kind] = StoredKey(key=key, ttl_s=ttl if ttl >= 0 else None, value=value)
    pending: dict[str, Any] = {}
    for key in client.scan_iter(match=_glob(keys.prefix) + "streams:*:pending:*"):
        value = client.hget(key, user_id)
        if value is not None:
            pending[_text(key)] = orjson.loads(value)
    return UserExport(user_id=user_id, key_prefix=keys.prefix, keys=stored, pending_notices=pending)


def read_erasures(
    kafka: Mapping[str, Any], topic: str, timeout_s: float = 30.0, *, group: str | None = None
) -> dict[str, UserErased]:
    """Every erased user's latest record on ``topic``, read from its start to its current end.

    ``group``: the consumer group id the reader names (it joins no group and commits nothing,
    but the broker checks the caller's rights on it); default a random one.

    A tombstone (an operator undoing a record) removes the user; a record that does not parse
    is skipped (it was not written by :func:`erase_user`). A topic that does not exist holds no
    erasure.
    """
    consumer = _reader(kafka, group)
    erased: dict[str, UserErased] = {}
    refused = 0
    try:
        highs = _highs(consumer, topic, timeout_s, missing_ok=True)
        todo = {p: h for p, h in highs.items() if h > 0}
        if not todo:
            return {}
        consumer.assign([TopicPartition(topic, p, 0) for p in todo])  # 0: the earliest retained
        deadline = time.monotonic() + timeout_s
        while todo:
            if time.monotonic() > deadline:
                raise ErasureFailed(f"reading {topic}: no end after {timeout_s:.0f}s")
            for message in consumer.consume(1000, timeout=0.5):
                partition = message.partition()
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        todo.pop(partition or 0, None)
                        continue
                    raise ErasureFailed(f"reading {topic}/{partition}: {error}")
                key = message.key()
                if key is not None:
                    value = message.value()
                    user = key.decode(errors="replace")
                    if value is None:
                        erased.pop(user, None)
                    else:
                        try:
                            record = UserErased.model_validate_json(value)
                        except ValueError:
                            record = None
                        if record is not None and record.user_id == user:
                            erased[user] = record
                        else:  # only admin and the eraser may write here; say it, never guess
                            refused += 1
                            log.warning(
                                "ignored a malformed erasure record at %s/%d@%d",
                                topic,
                                partition,
                                message.offset() or 0,
                            )
                offset = message.offset() or 0
                if partition in todo and offset + 1 >= todo[partition]:
                    todo.pop(partition)
    finally:
        consumer.close()
    ERASURES_REFUSED.set(refused)
    return erased


def restore_markers(client: redis.Redis, keys: Keys, erasures: Iterable[UserErased]) -> int:
    """Write each erasure's marker under ``keys``' prefix (watermarks only move forward)."""
    script = client.register_script(ERASE_LUA)
    n = 0
    for record in erasures:
        script(
            keys=[keys.erased(record.user_id)],
            args=[1, orjson.dumps(record.fields()), record.erased_at_ms],
        )
        n += 1
    return n


class Eraser:
    """Erasure and export with their clients, connected as the ``eraser`` principal (the one
    allowed to delete any user's keys and to write ``users.erased``). Close it."""

    def __init__(self, settings: CommonSettings, principal: str | None = ERASER) -> None:
        self.settings = settings
        self.principal = principal
        self.keys = Keys(settings.key_prefix)
        self.kafka = security.kafka_config(settings, principal)
        self.redis = security.redis_client(settings, principal)
        self._producer: Producer | None = None

    def erase(self, user_id: str) -> ErasureReport:
        if self._producer is None:
            self._producer = idempotent_producer(self.settings, self.principal)
        return erase_user(
            self.redis,
            self._producer,
            self.kafka,
            user_id=user_id,
            prefix=self.settings.key_prefix,
            clickstream=self.settings.topic_clickstream,
            erased_topic=self.settings.topic_users_erased,
        )

    def export(self, user_id: str) -> UserExport:
        return export_user(self.redis, self.keys, user_id)

    def close(self) -> None:
        try:
            if self._producer is not None:
                self._producer.flush(10.0)
        except KafkaException as exc:  # a producer the broker refused (fatal): nothing to flush
            log.warning("erasure producer closed with %s", exc)
        finally:
            self.redis.close()

    def __enter__(self) -> Eraser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- helpers ---------------------------------------------------------------------------------


def _reader(kafka: Mapping[str, Any], group: str | None = None) -> Consumer:
    return Consumer(
        {
            **kafka,
            # Required by librdkafka even for manual assignment; nothing is ever committed.
            "group.id": group or f"recstream-erasure-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )


def _highs(
    consumer: Consumer, topic: str, timeout_s: float, *, missing_ok: bool = False
) -> dict[int, int]:
    """Partition -> high watermark. A topic the broker does not know is ``{}`` when
    ``missing_ok``, else asked again until ``timeout_s`` (a topic just created takes a moment to
    show), as is a partition without a leader yet (a broker restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            meta = consumer.list_topics(topic, timeout=timeout_s)
            info = meta.topics.get(topic)
            if info is None or info.error is not None or not info.partitions:
                if missing_ok:
                    return {}
                if time.monotonic() > deadline:
                    raise ErasureFailed(f"topic {topic!r} does not exist")
                time.sleep(0.2)
                continue
            return {
                p: int(
                    consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1]
                )
                for p in sorted(info.partitions)
            }
        except KafkaException as exc:
            if not transient(exc) or time.monotonic() > deadline:
                raise ErasureFailed(f"cannot read the end offsets of {topic!r}: {exc}") from exc
            time.sleep(0.2)


def _publish(producer: Producer, topic: str, key: str, value: bytes, timeout_s: float) -> None:
    failure: list[KafkaError] = []

    def delivered(error: KafkaError | None, _message: object) -> None:
        if error is not None:
            failure.append(error)

    producer.produce(topic, key=key.encode(), value=value, on_delivery=delivered)
    if producer.flush(timeout_s) or failure:
        why = failure[0] if failure else f"no ack after {timeout_s:.0f}s"
        raise ErasureFailed(f"Kafka did not take the erasure record on {topic!r}: {why}")


def _rebuild_prefixes(client: redis.Redis, live: Keys) -> list[str]:
    """The key prefixes of the rebuilds in progress under ``live`` (those with a state hash)."""
    state = live.namespace("*").replay_state()  # {prefix}ns:*:replay:state
    pattern = _glob(live.prefix) + state[len(live.prefix) :]
    suffix = "replay:state"
    return sorted(
        {_text(k)[: -len(suffix)] for k in client.scan_iter(match=pattern, count=_SCAN_COUNT)}
    )


def _forget_pending(client: redis.Redis, live: Keys, user_id: str) -> int:
    """Remove the user's notices from every pending hash of every stream worker group."""
    removed = 0
    for key in client.scan_iter(match=_glob(live.prefix) + "streams:*:pending:*"):
        removed += int(client.hdel(key, user_id))
    return removed


def _read_key(client: redis.Redis, key: str) -> Any:
    """A key's value as JSON-ready data (None when absent); a string that is JSON is decoded."""
    kind = _text(client.type(key))
    value: Any = None
    if kind == "hash":
        value = {_text(k): _text(v) for k, v in client.hgetall(key).items()}
    elif kind == "zset":
        pairs: Any = client.zrange(key, 0, -1, withscores=True)
        value = [[_text(member), score] for member, score in pairs]
    elif kind == "string":
        raw = client.get(key)
        try:
            value = orjson.loads(raw) if raw is not None else None
        except orjson.JSONDecodeError:
            value = _text(raw) if raw is not None else None
    elif kind == "set":
        value = sorted(_text(m) for m in client.smembers(key))
    elif kind == "list":
        value = [_text(v) for v in client.lrange(key, 0, -1)]
    elif kind != "none":
        value = f"<{kind}>"
    return value


def _valid_id(user_id: str) -> bool:
    try:
        _ID.validate_python(user_id)
    except ValidationError:
        return False
    return True


def _prefix_of(key: str) -> str:
    """The key prefix (namespace) of a user key: everything before ``u:{``."""
    return key[: key.find("u:{")]


def _glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
