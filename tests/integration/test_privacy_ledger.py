"""The per-user privacy budget in real Redis: one spend per version, refusals, windows, races."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from inference.privacy import GrantOutcome, PrivacyLedger
from recstream.keys import Keys
from recstream.security import redis_client
from tests.conftest import Namespace

pytestmark = pytest.mark.integration


@pytest.fixture
def client(ns: Namespace) -> Iterator[redis.Redis]:
    c = redis_client(ns.settings)
    yield c
    c.close()


def _ledger(ns: Namespace, client: redis.Redis, budget: float, window: float) -> PrivacyLedger:
    return PrivacyLedger(client, Keys(ns.settings.key_prefix), budget, window)


def test_releases_spend_until_the_budget_then_are_refused_and_counted(
    ns: Namespace, client: redis.Redis
) -> None:
    ledger = _ledger(ns, client, budget=1.0, window=0.0)
    outcomes = [ledger.spend("u:1", v, 0.3, b"v%d" % v).outcome for v in range(1, 6)]
    assert outcomes == ["granted"] * 3 + ["refused"] * 2
    assert ledger.spent_rho("u:1") == pytest.approx(0.9)
    assert ledger.refused("u:1") == 2
    # Another user's budget is untouched, and the key is the user's hash-tagged one.
    assert ledger.spent_rho("u:2") == 0.0
    assert client.exists(Keys(ns.settings.key_prefix).user_base("u:1") + "privacy")


def test_one_release_per_version_and_an_unconfirmed_one_is_republished_for_free(
    ns: Namespace, client: redis.Redis
) -> None:
    ledger = _ledger(ns, client, budget=1.0, window=0.0)
    assert ledger.spend("u", 3, 0.25, b"first").outcome is GrantOutcome.GRANTED
    # Redelivered before the release was confirmed: the stored vector again, no new spend.
    again = ledger.spend("u", 3, 0.25, b"other noise")
    assert (again.outcome, again.payload) == (GrantOutcome.PENDING, b"first")
    assert ledger.spent_rho("u") == pytest.approx(0.25)
    assert ledger.confirm("u", 3)
    assert ledger.spend("u", 3, 0.25, b"x").outcome is GrantOutcome.DUPLICATE
    assert ledger.spend("u", 2, 0.25, b"x").outcome is GrantOutcome.DUPLICATE
    assert ledger.spent_rho("u") == pytest.approx(0.25)
    # Confirming a version that is not the last granted one drops nothing.
    assert ledger.spend("u", 4, 0.25, b"fourth").outcome is GrantOutcome.GRANTED
    assert not ledger.confirm("u", 3)
    assert ledger.spend("u", 4, 0.25, b"x").payload == b"fourth"


def test_a_new_window_starts_with_a_fresh_budget_and_the_key_expires_with_it(
    ns: Namespace, client: redis.Redis
) -> None:
    ledger = _ledger(ns, client, budget=0.5, window=3600.0)
    start = 2_000_000_000.0  # a fixed clock in the future so the expiry is in the future too
    assert ledger.spend("w", 1, 0.5, b"a", now=start).outcome is GrantOutcome.GRANTED
    assert ledger.spend("w", 2, 0.5, b"b", now=start + 3599).outcome is GrantOutcome.REFUSED
    assert ledger.spend("w", 3, 0.5, b"c", now=start + 3600).outcome is GrantOutcome.GRANTED
    key = Keys(ns.settings.key_prefix).privacy_ledger("w")
    assert client.pexpiretime(key) == int((start + 7200) * 1000)


def test_concurrent_releases_never_overspend(ns: Namespace, client: redis.Redis) -> None:
    # The check and the spend are one script: racing writers cannot both take the last share.
    ledger = _ledger(ns, client, budget=1.0, window=0.0)
    granted: list[int] = []
    lock = threading.Lock()

    def writer(offset: int) -> None:
        local = redis_client(ns.settings)
        mine = _ledger(ns, local, budget=1.0, window=0.0)
        for v in range(offset, 400, 4):
            if mine.spend("race", v + 1, 0.1, b"x").outcome is GrantOutcome.GRANTED:
                with lock:
                    granted.append(v)
        local.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert 1 <= len(granted) <= 10
    assert ledger.spent_rho("race") <= 1.0 + 1e-9
    assert ledger.spent_rho("race") == pytest.approx(0.1 * len(granted))
