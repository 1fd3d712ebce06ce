"""The returning users' schedule on a real Redis (``consumers.returning``)."""

from __future__ import annotations

import pytest

from consumers.returning import ReturningUsers
from inference.trending import REFRESH_EVERY_S, REFRESH_HORIZON_S
from recstream.keys import Keys
from recstream.security import redis_client
from tests.conftest import Namespace

pytestmark = pytest.mark.integration

HOUR = 3_600.0


def test_due_users_are_claimed_once_and_each_is_due_again_on_its_next_day(ns: Namespace) -> None:
    client = redis_client(ns.settings)
    keys = Keys(ns.settings.key_prefix)
    try:
        schedule = ReturningUsers(client, keys, idle_s=int(HOUR), below=4)
        assert schedule.wanted(1) and schedule.wanted(3)
        assert not schedule.wanted(0) and not schedule.wanted(4)
        weird = "u:{1}\\n*"  # ids are members, never keys: any id is just a name here
        assert schedule.schedule([("a", 0.0), ("b", 100.0), (weird, 5 * HOUR)]) == 3
        assert schedule.claim(clock=HOUR - 1, limit=10) == []  # nobody away an hour yet
        assert schedule.claim(clock=HOUR + 100, limit=1) == [("a", HOUR)]  # oldest first
        assert schedule.claim(clock=HOUR + 100, limit=10) == [("b", HOUR + 100)]
        assert schedule.claim(clock=HOUR + 100, limit=10) == []  # claimed: not again today
        assert client.zscore(keys.returning(), "a") == HOUR + REFRESH_EVERY_S
        # A new event sets the due time again, from that event.
        schedule.schedule([("b", 2 * HOUR)])
        assert client.zscore(keys.returning(), "b") == 3 * HOUR
        # A clock far ahead (a stopped service, a replay) makes one list, not one per day missed.
        later = 10 * REFRESH_EVERY_S
        claimed = dict(schedule.claim(clock=later, limit=10))
        assert claimed == {"a": HOUR + REFRESH_EVERY_S, "b": 3 * HOUR, weird: 6 * HOUR}
        assert schedule.claim(clock=later, limit=10) == []
        assert client.zscore(keys.returning(), "a") == HOUR + 10 * REFRESH_EVERY_S
        assert schedule.expired(HOUR + REFRESH_HORIZON_S + 1, newest=HOUR)
        assert not schedule.expired(REFRESH_HORIZON_S, newest=0.0)
        assert schedule.drop(["a", weird, "nobody"]) == 2 and schedule.drop([]) == 0
        assert client.zrange(keys.returning(), 0, -1) == [b"b"]
    finally:
        client.delete(keys.returning())
        client.close()
