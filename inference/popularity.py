"""The one popularity model: the pool's fallback and the lab's ``pop`` baseline.

It needs no torch and answers in microseconds, so a timed-out or failed request still gets a
real, catalog-only list inside the parent process. Served from an artifact, its counts are the
training popularity stored in ``items.json``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from inference.recommender import Ranked

__all__ = ["Popularity"]


class Popularity:
    """Most-interacted items, the same list for everyone, seen items excluded."""

    name = "pop"
    version = "1"

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = dict(counts)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        top = ranked[0][1] if ranked and ranked[0][1] > 0 else 1
        self._ranked: list[tuple[str, float]] = [(item, n / top) for item, n in ranked]

    @classmethod
    def from_interactions(cls, item_ids: Sequence[str]) -> Popularity:
        return cls(dict(Counter(item_ids)))

    @property
    def items(self) -> list[str]:
        return [item for item, _ in self._ranked]

    def recommend(self, histories: list[list[str]], k: int) -> list[Ranked]:
        out: list[Ranked] = []
        for history in histories:
            seen = set(history)
            picks: Ranked = []
            for item, score in self._ranked:
                if item not in seen:
                    picks.append((item, score))
                    if len(picks) == k:
                        break
            out.append(picks)
        return out
