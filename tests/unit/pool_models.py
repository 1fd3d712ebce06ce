"""Small deterministic recommenders that pool tests load inside spawned worker processes."""

from __future__ import annotations

import time

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

    def recommend(self, histories: list[list[str]], k: int) -> list[list[tuple[str, float]]]:
        if self.fail and any("boom" in h for h in histories):
            raise ValueError("boom")
        time.sleep(self.delay_s)
        return [[(BOGUS, 99.0), *expected(h, k)] for h in histories]


def expected(history: list[str], k: int) -> list[tuple[str, float]]:
    offset = len(history) % len(CATALOG)
    seen = set(history)
    ranked = [CATALOG[(offset + n) % len(CATALOG)] for n in range(len(CATALOG))]
    return [(item, float(len(CATALOG) - n)) for n, item in enumerate(ranked) if item not in seen][
        :k
    ]


def make_echo(delay_s: float = 0.0, fail: bool = False) -> EchoRecommender:
    return EchoRecommender(delay_s, fail)
