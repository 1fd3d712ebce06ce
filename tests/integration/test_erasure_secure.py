"""Erasure on the secure stack: the ``eraser`` principal has every right erasure and export need
(the clickstream's end offsets, users.erased, any user's keys, the pending notices), the stream
worker's principal reads the record and the marker, and the API's principal cannot erase.

Reuses the secure stack of ``test_secure_stack.py`` (its module fixture: one stack per module).
"""

from __future__ import annotations

import pytest

from recstream.keys import Keys
from recstream.security import kafka_config, redis_client
from streams.erasure import Eraser, read_erasures
from streams.exceptions import ErasureFailed
from streams.settings import StreamsSettings
from tests.integration.test_secure_stack import Secure, secure

pytestmark = pytest.mark.integration

__all__ = ["secure"]  # the fixture, imported for this module


def test_the_eraser_erases_and_exports_and_the_api_principal_cannot(secure: Secure) -> None:
    s = secure.settings
    keys, rebuild = Keys(s.key_prefix), Keys(s.key_prefix).namespace("r1")
    admin = redis_client(s, "admin")
    streams = redis_client(s, "streams")
    try:
        for user in ("gone", "kept"):
            admin.hset(keys.profile(user), mapping={"version": "1", "events": "1"})
            admin.zadd(keys.seen(user), {f"{user}-e1": 1.0})
            admin.set(keys.recs(user), b'{"profile_version": 1}')
            admin.hset(keys.privacy_ledger(user), "rho", "0.03")
            admin.hset(rebuild.profile(user), "version", "1")
        admin.hset(rebuild.replay_state(), "phase", "folding")
        admin.hset(keys.pending_changes("g", s.topic_clickstream, 0), "gone", b"[1, null]")
        admin.zadd(keys.returning(), {"gone": 1.0, "kept": 2.0})  # lists to make again

        # The API's credentials reach no topic: nothing is recorded, so nothing is deleted.
        with Eraser(s, principal="api") as api, pytest.raises(ErasureFailed):
            api.erase("gone")
        assert admin.exists(keys.profile("gone")) == 1

        with Eraser(s) as eraser:
            assert eraser.export("gone").keys["privacy"].value == {"rho": "0.03"}
            receipt = eraser.erase("gone").receipt()
        assert receipt.deleted_keys == 4 + 1  # profile, seen, list, ledger; the rebuild copy
        assert sorted(receipt.marked) == sorted([keys.prefix, rebuild.prefix])
        left = {k.decode() for k in admin.scan_iter(match="*{gone}*")}
        assert left == {keys.erased("gone"), rebuild.erased("gone")}
        assert admin.hget(keys.pending_changes("g", s.topic_clickstream, 0), "gone") is None
        assert admin.zrange(keys.returning(), 0, -1) == [b"kept"]  # the user's id is gone
        assert admin.exists(keys.profile("kept"), rebuild.profile("kept")) == 2
        # The stream worker's principal reads the record and the marker the fold checks.
        group = f"{StreamsSettings().streams_app_id}-erasures"  # as the worker reads it
        assert "gone" in read_erasures(
            kafka_config(s, "streams"), s.topic_users_erased, group=group
        )
        assert streams.hget(keys.erased("gone"), "erased_at_ms") is not None
    finally:
        admin.close()
        streams.close()
