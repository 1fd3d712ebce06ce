"""Read a user's profile as the stream processor stores it in Redis (for other services).

Layout (prefix = ``RECSTREAM_KEY_PREFIX``; ``{u}`` is the escaped, hash-tagged user id, see
``recstream/keys.py``), written only by ``streams/fold.lua``:

- ``u:{u}:profile`` hash: ``version`` (+1 per change), ``events`` (events folded), ``ref_ts``
  (reference time T = newest event ts, epoch seconds), ``base_ts`` (B), ``half_life_s`` (h),
  ``emitted_mix`` (JSON category mix at the last ProfileChanged).
- ``u:{u}:items`` / ``u:{u}:cats`` hashes: item / category -> weight scaled to B (the heaviest
  ``profile_items_max`` / ``profile_categories_max`` kept); the value at T is
  ``stored * 2 ** (-(T - B) / h)``.
- ``u:{u}:recent`` sorted set: item -> newest interaction ts, bounded.
- ``u:{u}:seen`` sorted set: event id -> ts, for de-duplication, bounded.

Every one of them expires ``profile_idle_ttl_s`` after the user's last fold.

Use :func:`read_profile` with a ``redis.Redis`` client or :func:`read_profile_async` with a
``redis.asyncio.Redis`` client; both return a :class:`schemas.Profile` or ``None``.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio

from recstream.keys import Keys
from schemas import Profile
from streams.fold import to_datetime


def _commands(pipe: Any, keys: Keys, user_id: str) -> None:
    pipe.hgetall(keys.profile(user_id))
    pipe.hgetall(keys.profile_items(user_id))
    pipe.hgetall(keys.profile_categories(user_id))
    pipe.zrevrange(keys.profile_recent(user_id), 0, -1)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(user_id: str, replies: list[Any]) -> Profile | None:
    head, items, cats, recent = replies
    if not head:
        return None
    head = {_text(k): _text(v) for k, v in head.items()}
    ref, base, half_life = float(head["ref_ts"]), float(head["base_ts"]), float(head["half_life_s"])
    factor = 2.0 ** (-(ref - base) / half_life)
    return Profile(
        user_id=user_id,
        version=int(head["version"]),
        event_count=int(head["events"]),
        last_event_ts=to_datetime(ref),
        half_life_s=half_life,
        recent_items=[_text(item) for item in recent],
        item_weights={_text(k): float(v) * factor for k, v in items.items()},
        category_affinities={_text(k): float(v) * factor for k, v in cats.items()},
    )


def read_profile(client: redis.Redis, keys: Keys, user_id: str) -> Profile | None:
    """The user's profile decayed to its newest event, or ``None`` if it has none."""
    pipe = client.pipeline(transaction=True)
    _commands(pipe, keys, user_id)
    return _decode(user_id, pipe.execute())


def read_profile_and(
    client: redis.Redis, keys: Keys, user_id: str, key: str
) -> tuple[Profile | None, Any]:
    """:func:`read_profile` and the value of one more of the user's keys (``GET key``), in the
    same transaction: one round trip where a hot loop needs both."""
    pipe = client.pipeline(transaction=True)
    _commands(pipe, keys, user_id)
    pipe.get(key)
    *replies, value = pipe.execute()
    return _decode(user_id, replies), value


async def read_profile_async(
    client: redis.asyncio.Redis, keys: Keys, user_id: str
) -> Profile | None:
    """Async twin of :func:`read_profile`."""
    pipe = client.pipeline(transaction=True)
    _commands(pipe, keys, user_id)
    return _decode(user_id, await pipe.execute())
