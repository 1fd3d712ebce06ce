"""Returning users: whose lists the regeneration service makes again while they are away.

An artifact whose recent-popularity blend is for returning users (``TrendingConfig.idle_s`` > 0,
``inference.trending``) gets the model's list alone as a user's events are folded: what they do
next is what the model predicts best. Once the user has been away ``idle_s`` the list should
hold what is popular now, so the regeneration service makes it again then, and once a day
(:data:`~inference.trending.REFRESH_EVERY_S`) while the window moves, for up to
:data:`~inference.trending.REFRESH_HORIZON_S` after their newest event: the moments the lab
judges the blend at (:func:`inference.trending.refresh_moment`).

The schedule is one Redis sorted set (:meth:`recstream.keys.Keys.returning`): member the user id,
score when their list is next due, in event time. Each list made for a short history as its
events are folded (re)sets the user's due time to their newest event plus ``idle_s``
(:meth:`ReturningUsers.schedule`). :meth:`ReturningUsers.claim` takes the due users and moves
each one's due time a day on in the same script, so two services never make the same list
twice and a crash costs at most that day's list, never a loop. The regeneration service drops a
claimed user whose history has grown past the blend, whose profile is gone, or whose horizon
has passed (:meth:`ReturningUsers.drop`); erasure removes the user too (``streams.erasure``).
The clock is the newest event time the service has seen (a replay of old events is refreshed
on its own time, as its counts are), never ahead of the wall clock.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis

from inference.trending import REFRESH_EVERY_S, REFRESH_HORIZON_S
from recstream.keys import Keys

__all__ = ["ReturningUsers"]

log = logging.getLogger(__name__)

# KEYS[1] the schedule; ARGV[1] the clock, ARGV[2] how many at most, ARGV[3] the step.
# Returns user, due, user, due, ... of the claimed ones, each moved on to its first step after
# the clock (a service that was stopped, or a replay's fast clock, makes one list, not many).
_CLAIM = """
local clock, step = tonumber(ARGV[1]), tonumber(ARGV[3])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', clock, 'WITHSCORES', 'LIMIT', 0,
  tonumber(ARGV[2]))
for i = 1, #due, 2 do
  local at = tonumber(due[i + 1])
  redis.call('ZADD', KEYS[1], 'XX', at + (math.floor((clock - at) / step) + 1) * step, due[i])
end
return due
"""


class ReturningUsers:
    """The schedule of returning users' lists for a blend served after ``idle_s`` to histories
    shorter than ``below`` items."""

    def __init__(self, client: redis.Redis, keys: Keys, idle_s: int, below: int) -> None:
        self.client, self.key = client, keys.returning()
        self.idle_s, self.below = idle_s, below
        self._claim = client.register_script(_CLAIM)

    def wanted(self, history_length: int) -> bool:
        """Whether a history of this many items gets its list made again (the blend's range)."""
        return 0 < history_length < self.below

    def schedule(self, users: Iterable[tuple[str, float]]) -> int:
        """(Re)set each ``(user, newest event time)``'s list due ``idle_s`` after that event."""
        due = {user: newest + self.idle_s for user, newest in users}
        if not due:
            return 0
        self.client.zadd(self.key, due)
        return len(due)

    def claim(self, clock: float, limit: int) -> list[tuple[str, float]]:
        """Up to ``limit`` users due at ``clock`` (event time) with their due times, oldest
        first; each is due again on its first daily step after ``clock`` (until :meth:`drop`)."""
        if limit <= 0:
            return []
        raw = self._claim(keys=[self.key], args=[clock, limit, REFRESH_EVERY_S])
        out = []
        for user, due in zip(raw[::2], raw[1::2], strict=True):
            name = user.decode() if isinstance(user, bytes) else str(user)
            out.append((name, float(due)))
        return out

    def expired(self, due: float, newest: float) -> bool:
        """Whether a list due at ``due`` for a user whose newest event is ``newest`` is past the
        horizon (the last remaking is no later than the horizon after that event)."""
        return due > newest + REFRESH_HORIZON_S

    def drop(self, users: Iterable[str]) -> int:
        """Make no more lists again for ``users``."""
        gone = list(users)
        return int(self.client.zrem(self.key, *gone)) if gone else 0
