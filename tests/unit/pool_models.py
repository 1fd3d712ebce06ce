"""Small deterministic recommenders that pool tests load inside spawned worker processes."""

from __future__ import annotations

import time
from typing import Any

CATALOG = [f"i{n}" for n in range(40)]
BOGUS = "not-in-catalog"


class EchoRecommender:
    """Ranks the catalog by a fixed rule of the history, and slips in one bogus item first.

    The expected answer for a history is ``expected(history, k)``, so tests can compare exactly.
    """

    name = "echo"
    version = "7"

    def __init__(self, delay_s: float, fail: bool) -> None:
        self.delay_s = delay_s
        self.fail = fail

    def recommend(self, histories: list[list[str]], k: int) -> list[list[tuple[Any, float]]]:
        if self.fail and any("boom" in h for h in histories):
            raise ValueError("boom")
        if any("garbage" in h for h in histories):  # an answer of the wrong shape
            return [None for _ in histories]  # type: ignore[misc]  # wrong on purpose
        if any("unreadable" in h for h in histories):  # an answer the parent cannot unpickle
            return [[(Unreadable(), 1.0)] for _ in histories]
        time.sleep(self.delay_s)
        return [[(BOGUS, 99.0), *expected(h, k)] for h in histories]


def _refuse_to_unpickle() -> None:
    raise ValueError("this answer cannot be read back")


class Unreadable:
    """Pickles in the worker, raises when the pool's I/O thread unpickles it."""

    def __reduce__(self) -> tuple[Any, tuple[()]]:
        return (_refuse_to_unpickle, ())


def expected(history: list[str], k: int) -> list[tuple[str, float]]:
    offset = len(history) % len(CATALOG)
    seen = set(history)
    ranked = [CATALOG[(offset + n) % len(CATALOG)] for n in range(len(CATALOG))]
    return [(item, float(len(CATALOG) - n)) for n, item in enumerate(ranked) if item not in seen][
        :k
    ]


def make_echo(delay_s: float = 0.0, fail: bool = False, load_s: float = 0.0) -> EchoRecommender:
    time.sleep(load_s)  # a model that takes this long to load in each (re)started worker
    return EchoRecommender(delay_s, fail)


STRANGER = "someone-elses-item"


class ExplainingRecommender(EchoRecommender):
    """An echo model that explains its lists, with reasons a pool must not pass on as they are:
    an item outside the history, repeats, and more than three; and popular items of which only
    the first is a count of users the wire may carry (the others: too few users, not a whole
    number, a flag, an item not listed)."""

    name = "explaining"
    recent_days = 7

    def explain(self, history: list[str], items: list[str]) -> dict[str, list[str]]:
        if "explain-boom" in history:
            raise ValueError("cannot explain")
        newest, oldest = history[-1], history[0]
        return {item: [newest, STRANGER, oldest, oldest, *history] for item in items}

    def popular(self, history: list[str], items: list[str]) -> dict[str, Any]:
        counts: list[Any] = [12, 2, 7.5, True]
        listed = [i for i in items if i != BOGUS]
        return {**dict(zip(listed, counts, strict=False)), STRANGER: 40}


def make_explaining() -> ExplainingRecommender:
    return ExplainingRecommender(0.0, False)


class RecentEcho:
    """Lists the catalog items of the recent-popularity counts it was given, most counted first
    (none before any): shows which counts a worker's model holds."""

    name = "recent-echo"
    version = "1"
    recent_days = 7

    def __init__(self) -> None:
        self.counts: dict[str, float] = {}

    def use_recent(self, counts: dict[str, float] | None) -> None:
        self.counts = dict(counts or {})

    def recommend(self, histories: list[list[str]], k: int) -> list[list[tuple[str, float]]]:
        ranked = sorted(self.counts.items(), key=lambda kv: -kv[1])
        return [[(i, float(n)) for i, n in ranked if i not in h][:k] for h in histories]


def make_recent_echo() -> RecentEcho:
    return RecentEcho()


class _Blend:
    """What a returning users' blend tells the worker: how long away, below how many items."""

    idle_s = 3600
    below = 4


class ReturningEcho(RecentEcho):
    """A recent-popularity echo whose counts are for lists made again for returning users only:
    a list made as events are folded is the echo model's, a returning one lists the counts."""

    name = "returning-echo"
    refreshes = True
    trending = _Blend()

    def recommend(
        self, histories: list[list[str]], k: int, returning: list[bool] | None = None
    ) -> list[list[tuple[str, float]]]:
        counted = super().recommend(histories, k)
        flags = returning if returning is not None else [False] * len(histories)
        rows = zip(histories, counted, flags, strict=True)
        return [c if back else expected(h, k) for h, c, back in rows]


def make_returning_echo() -> ReturningEcho:
    return ReturningEcho()
