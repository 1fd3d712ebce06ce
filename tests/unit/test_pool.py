"""The worker pool: batching, validation, timeouts, failures, crashes and backpressure."""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from inference.exceptions import InferenceError
from inference.pool import (
    REJECTED_ITEMS,
    PoolBrokenError,
    PoolConfig,
    PoolSaturatedError,
    WorkerPool,
)
from inference.popularity import Popularity
from tests.unit.pool_models import (
    BOGUS,
    CATALOG,
    expected,
    make_echo,
    make_recent_echo,
    make_returning_echo,
)

FALLBACK = Popularity({item: 100 - n for n, item in enumerate(CATALOG)})


def _pool(config: PoolConfig, delay_s: float = 0.0, fail: bool = False) -> WorkerPool:
    loader = functools.partial(make_echo, delay_s=delay_s, fail=fail)
    return WorkerPool(loader, FALLBACK, CATALOG, config).start()


@pytest.fixture(scope="module")
def fast_pool() -> Iterator[WorkerPool]:
    pool = _pool(PoolConfig(workers=1, max_batch_size=8, max_wait_ms=20), fail=True)
    yield pool
    pool.close()


def test_answers_match_the_model_and_drop_items_outside_the_catalog(
    fast_pool: WorkerPool,
) -> None:
    before = REJECTED_ITEMS._value.get()
    histories = [CATALOG[:n] for n in range(1, 21)]
    futures = [fast_pool.submit(h, k=5) for h in histories]
    results = [f.result(10) for f in futures]
    for history, result in zip(histories, results, strict=True):
        assert result.source == "model"
        assert result.model_name == "echo"
        assert result.model_version == "7"
        assert result.items == expected(history, 5)
        assert BOGUS not in [item for item, _ in result.items]
    assert REJECTED_ITEMS._value.get() - before == len(histories)


def test_concurrent_requests_are_batched(fast_pool: WorkerPool) -> None:
    from inference.pool import BATCH_SIZE

    def batches() -> tuple[float, float]:
        samples = {s.name: s.value for s in next(iter(BATCH_SIZE.collect())).samples}
        return samples["recs_pool_batch_size_count"], samples["recs_pool_batch_size_sum"]

    count0, sum0 = batches()
    futures = [fast_pool.submit([f"i{n}"], k=3) for n in range(16)]
    for f in futures:
        f.result(10)
    count1, sum1 = batches()
    assert sum1 - sum0 == 16
    assert count1 - count0 < 16  # at least one batch carried several requests


def test_a_model_error_yields_a_fallback_not_nothing(fast_pool: WorkerPool) -> None:
    result = fast_pool.submit(["i1", "boom"], k=4).result(10)
    assert result.source == "fallback"
    assert result.reason == "model_error"
    assert result.items == FALLBACK.recommend([["i1", "boom"]], 4)[0]


def test_health_check_touches_the_device(fast_pool: WorkerPool) -> None:
    health = fast_pool.health(timeout=10)
    assert health["ok"] is True
    assert health["workers"][0]["device"] in ("cpu", "cuda")
    assert health["workers"][0]["pid"] in fast_pool.worker_pids()


def test_timeout_answers_with_the_fallback() -> None:
    pool = _pool(PoolConfig(workers=1, request_timeout_s=0.2), delay_s=1.5)
    try:
        result = pool.submit(["i3"], k=3).result(10)
        assert result.source == "fallback"
        assert result.reason == "timeout"
        assert result.items == [("i0", 1.0), ("i1", 0.99), ("i2", 0.98)]
    finally:
        pool.close(timeout=5)


def test_full_queue_refuses_instead_of_growing() -> None:
    pool = _pool(
        PoolConfig(workers=1, queue_size=3, max_batch_size=1, request_timeout_s=30), delay_s=0.5
    )
    try:
        first = pool.submit(["i1"])
        while pool.inflight == 0:  # readiness: the first request reached the worker
            time.sleep(0.005)
        held = [pool.submit(["i2"]) for _ in range(3)]
        with pytest.raises(PoolSaturatedError):
            pool.submit(["i3"])
        assert pool.capacity == 0
        assert all(f.result(10).source == "model" for f in [first, *held])
    finally:
        pool.close(timeout=5)


def test_a_killed_worker_loses_no_request() -> None:
    config = PoolConfig(workers=1, max_batch_size=4, request_timeout_s=60)
    pool = _pool(config, delay_s=0.3)
    try:
        histories = [CATALOG[:n] for n in range(1, 13)]
        futures = [pool.submit(h, k=4) for h in histories]
        while pool.inflight == 0:
            time.sleep(0.005)
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        results = [f.result(60) for f in futures]
        assert [r.source for r in results] == ["model"] * len(histories)
        assert [r.items for r in results] == [expected(h, 4) for h in histories]
        assert pool.worker_pids() and victim not in pool.worker_pids()
    finally:
        pool.close(timeout=5)


def test_on_a_cpu_a_killed_workers_twin_serves_while_the_replacement_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import inference.pool as pool_module

    monkeypatch.setattr(pool_module, "_cuda_devices", lambda: 0)
    monkeypatch.setattr(pool_module.os, "cpu_count", lambda: 2)
    loader = functools.partial(make_echo, load_s=3.0)
    pool = WorkerPool(loader, FALLBACK, CATALOG, PoolConfig(request_timeout_s=60)).start()
    try:
        # The default on a CPU with two cores; the second loads after the first is ready, and
        # the pool serves (and is healthy) meanwhile.
        assert len(pool.worker_pids()) == 2
        health = pool.health(timeout=1)
        assert health["ok"] and [w.get("starting", False) for w in health["workers"]] == [
            False,
            True,
        ]
        assert pool.submit(CATALOG[:2], k=4).result(2).source == "model"
        while any(w.get("starting") for w in pool.health(timeout=1)["workers"]):
            time.sleep(0.1)
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        histories = [CATALOG[:n] for n in range(1, 9)]
        results = [pool.submit(h, k=4).result(60) for h in histories]
        assert [r.source for r in results] == ["model"] * len(histories)
        assert [r.items for r in results] == [expected(h, 4) for h in histories]
        # Answered by the twin: the replacement is still loading its model, and the pool is
        # healthy meanwhile (one worker serves).
        health = pool.health(timeout=1)
        assert health["ok"]
        assert [w.get("starting", False) for w in health["workers"]].count(True) == 1
    finally:
        pool.close(timeout=5)


def test_a_signal_to_the_process_group_leaves_the_workers_to_the_pool(
    fast_pool: WorkerPool,
) -> None:
    """Ctrl-C or a supervisor's SIGTERM reaches the workers too; they keep serving until the
    draining service stops them."""
    pids = fast_pool.worker_pids()
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    time.sleep(0.5)
    assert fast_pool.worker_pids() == pids
    assert fast_pool.submit(CATALOG[:3], k=2).result(10).source == "model"


def test_a_single_core_gets_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import inference.pool as pool_module

    monkeypatch.setattr(pool_module, "_cuda_devices", lambda: 0)
    monkeypatch.setattr(pool_module.os, "cpu_count", lambda: 1)
    pool = _pool(PoolConfig())
    try:
        assert len(pool.worker_pids()) == 1
    finally:
        pool.close(timeout=5)


def test_an_answer_the_bookkeeping_cannot_read_gets_the_fallback_and_the_pool_goes_on(
    fast_pool: WorkerPool,
) -> None:
    # Wrong shape: _validate raises on it inside the I/O thread.
    garbage = fast_pool.submit(["i1", "garbage"], k=4).result(10)
    assert (garbage.source, garbage.reason) == ("fallback", "bad_answer")
    # Cannot be unpickled: the pipe's recv raises, the whole round fails and is contained.
    unreadable = fast_pool.submit(["i1", "unreadable"], k=4).result(10)
    assert (unreadable.source, unreadable.reason) == ("fallback", "io_error")
    after = fast_pool.submit(["i2"], k=4).result(10)
    assert after.source == "model" and after.items == expected(["i2"], 4)
    assert fast_pool.health(timeout=10)["ok"] is True


class FailingFallback:
    name = "failing"

    def recommend(self, histories: list[list[str]], k: int) -> list[list[tuple[str, float]]]:
        raise RuntimeError("fallback down")


def test_a_failing_fallback_answers_with_the_error_instead_of_hanging() -> None:
    loader = functools.partial(make_echo)
    pool = WorkerPool(loader, FailingFallback(), CATALOG, PoolConfig(workers=1)).start()
    try:
        with pytest.raises(InferenceError, match="fallback failed"):
            pool.submit(["garbage"], k=3).result(10)
        assert pool.submit(["i2"], k=3).result(10).source == "model"
    finally:
        pool.close(timeout=5)


def test_a_dead_io_thread_makes_the_pool_unhealthy_and_submit_raise() -> None:
    pool = _pool(PoolConfig(workers=1, request_timeout_s=60))
    try:

        def broken_bookkeeping() -> None:
            raise RuntimeError("bookkeeping bug")

        # Fault injection: every round of the I/O thread now raises before it dispatches, so
        # the request stays queued and containment gives up after a few rounds.
        pool._expire = broken_bookkeeping  # type: ignore[method-assign]  # injected fault
        waiting = pool.submit(["i1"], k=3)
        answer = waiting.result(10)  # answered, not left hanging
        assert (answer.source, answer.reason) == ("fallback", "pool_broken")
        assert pool.broken is not None and "bookkeeping bug" in pool.broken
        assert pool.health(timeout=1)["ok"] is False
        with pytest.raises(PoolBrokenError):
            pool.submit(["i2"], k=3)
    finally:
        pool.close(timeout=5)


def test_no_submit_waits_for_the_idle_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Submits racing the I/O thread's wake-up never leave a request for its idle timeout.

    With the idle round stretched to a minute, a lost wake-up shows as a request unanswered
    within seconds; several threads submitting while answers return is where wake-ups race.
    """
    import inference.pool as pool_module

    monkeypatch.setattr(pool_module, "IDLE_ROUND_S", 60.0)
    pool = _pool(PoolConfig(workers=1, max_batch_size=4, max_wait_ms=0, request_timeout_s=120))
    failures: list[BaseException] = []

    def client(n: int) -> None:
        try:
            for i in range(300):
                history = [f"i{(n + i) % 40}"]
                assert pool.submit(history, k=2).result(timeout=10).items
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        pool.close()
    assert not failures, f"{len(failures)} clients saw a stalled request: {failures[0]!r}"


def test_reasons_reach_the_caller_only_as_the_users_own_history() -> None:
    from inference.pool import UNEXPLAINED
    from tests.unit.pool_models import STRANGER, make_explaining

    pool = WorkerPool(
        make_explaining, FALLBACK, CATALOG, PoolConfig(workers=1, request_timeout_s=60)
    ).start()
    try:
        history = ["i3", "i9", "i5", "i7"]
        result = pool.submit(history, k=5).result(30)
        assert result.source == "model"
        because = result.reasons.history
        assert set(because) == {item for item, _ in result.items}
        for reasons in because.values():
            # The stranger and the repeat are dropped; three at most, all from the history.
            assert reasons == ["i7", "i3", "i9"]
            assert STRANGER not in reasons
        # Popular: only a whole count of at least the minimum of users, for a listed item.
        assert result.reasons.popular == {result.items[0][0]: 12}
        assert result.reasons.days == 7
        before = UNEXPLAINED._value.get()
        failed = pool.submit(["i1", "explain-boom"], k=5).result(30)
        assert failed.source == "model"  # the list stands without its reasons
        assert failed.items == expected(["i1", "explain-boom"], 5)
        assert failed.reasons.history == {}
        assert failed.reasons.popular == {}
        assert UNEXPLAINED._value.get() - before == 1
    finally:
        pool.close()


def test_recent_counts_reach_every_worker_before_its_next_batch_and_a_replacement() -> None:
    pool = WorkerPool(
        make_recent_echo, FALLBACK, CATALOG, PoolConfig(workers=1, request_timeout_s=60)
    ).start()
    try:
        assert pool.recent_days == 7  # what the model blends: what the caller must count

        def listed() -> list[str]:
            result = pool.submit(["i0"], k=5).result(30)
            assert result.source == "model"
            return [item for item, _ in result.items]

        assert listed() == []
        pool.set_recent({"i3": 5, "i1": 9, "i0": 50})
        assert listed() == ["i1", "i3"]  # the history's own item is never listed
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (not pool.worker_pids() or victim in pool.worker_pids()) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert listed() == ["i1", "i3"]  # the replacement was given them before its first batch
        pool.set_recent({"i2": 1})
        assert listed() == ["i2"]
        pool.set_recent(None)
        assert listed() == []
    finally:
        pool.close(timeout=5)


def test_a_list_made_again_for_a_returning_user_reaches_the_model_as_one() -> None:
    pool = WorkerPool(
        make_returning_echo, FALLBACK, CATALOG, PoolConfig(workers=1, max_wait_ms=50)
    ).start()
    try:
        # What the regeneration service schedules by: the model's idle time and history bound.
        assert (pool.recent_days, pool.recent_idle_s, pool.recent_below) == (7, 3600, 4)
        pool.set_recent({"i3": 5, "i1": 9})
        # One batch holding both kinds: each list is made as its request asked.
        folded = pool.submit(["i0"], k=5)
        back = pool.submit(["i0"], k=5, returning=True)
        assert folded.result(30).items == expected(["i0"], 5)
        assert [item for item, _ in back.result(30).items] == ["i1", "i3"]
    finally:
        pool.close(timeout=5)
    plain = WorkerPool(make_recent_echo, FALLBACK, CATALOG, PoolConfig(workers=1)).start()
    try:  # a blend for every list: nothing to make again
        assert (plain.recent_idle_s, plain.recent_below) == (0, 0)
    finally:
        plain.close(timeout=5)
