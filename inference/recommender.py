"""The one serving interface: what the worker pool runs and what every served model implements.

A recommender takes a batch of histories (item ids, oldest first) and returns, for each, up to
``k`` ``(item_id, score)`` pairs, best first, with the history's items excluded. It never names an
item outside its catalog. Offline ranking models in ``lab`` score index arrays instead; they reach
serving only through a verified artifact.

A model that blends recent popularity into short histories' lists (``inference.trending``) also
has ``recent_days`` (its window, in days) and ``use_recent(counts)`` (interactions per item id in
that window, or ``None``); the pool and the regeneration replay look for them, and every other
model goes without.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Ranked", "Recommender"]

Ranked = list[tuple[str, float]]


class Recommender(Protocol):
    """The one interface the pool serves."""

    def recommend(self, histories: list[list[str]], k: int) -> list[Ranked]: ...
