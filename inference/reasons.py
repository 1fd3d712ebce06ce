"""Why an item was recommended: the history items whose removal costs it the most score.

Attribution by occlusion on the served scorer itself: the user's history is scored once whole and
once without each of its newest items (one batch), and a history item's contribution to a
recommended item is how much that item's score falls without it. The scorer is whatever the
artifact serves (the transformer, EASE's weights and the Markov term, mixed; retrieval for short
histories), so the reasons follow the model's real dependence on the history rather than a
separate explanation model. Items whose removal does not lower the score are no reason.

CPU work (one batch through the model): run it in a worker thread, never on an event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["MAX_OCCLUDED", "MAX_REASONS", "HistoryScorer", "occlusion_reasons"]

MAX_REASONS = 3
MAX_OCCLUDED = 32
"""Only the newest this many history items are tried (one batch row each)."""


class HistoryScorer(Protocol):
    """What attribution needs of a loaded artifact (``inference.artifact.ArtifactRecommender``)."""

    index: dict[str, int]
    item_ids: list[str]

    def to_indices(self, history: list[str]) -> np.ndarray: ...

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray: ...


def occlusion_reasons(
    scorer: HistoryScorer,
    history: list[str],
    targets: Sequence[str],
    top: int = MAX_REASONS,
    max_occluded: int = MAX_OCCLUDED,
) -> dict[str, list[str]]:
    """For each target item, up to ``top`` history items (ids, most contributing first) whose
    removal from the history lowers the target's score, by how much it falls."""
    known = scorer.to_indices(history)
    cols = [scorer.index[t] for t in targets if t in scorer.index]
    out: dict[str, list[str]] = {t: [] for t in targets}
    if len(known) < 2 or not cols:  # one item is the only possible reason, and not a measured one
        if len(known) == 1:
            only = scorer.item_ids[int(known[0])]
            out = {t: [only] for t in targets if t in scorer.index}
        return out
    # Distinct items, newest occurrence first, at most max_occluded of them.
    order = list(dict.fromkeys(int(i) for i in known[::-1]))[:max_occluded]
    rows = [known] + [known[known != item] for item in order]
    scores = np.asarray(scorer.score(rows), dtype=np.float64)[:, cols]
    drops = scores[0] - scores[1:]  # (occluded item, target)
    for c, target in enumerate(t for t in targets if t in scorer.index):
        ranked = np.argsort(-drops[:, c], kind="stable")
        out[target] = [scorer.item_ids[order[r]] for r in ranked[:top] if drops[r, c] > 0.0]
    return out
