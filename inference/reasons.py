"""Why an item was recommended: the history items that contribute most to its score.

Two attributions, both measured against the served scorer (``python -m bench.reasons``):

- :func:`occlusion_reasons`, for conversation replies: the user's history is scored once whole
  and once without each of its newest items (one batch), and a history item's contribution to a
  recommended item is how much that item's score falls without it. The scorer is whatever the
  artifact serves (the transformer, EASE's weights and the Markov term, fused; retrieval for short
  histories). It costs one model pass per history item tried (70-160 ms a list on a CPU).
- :func:`weight_reasons`, for every list the regeneration service publishes: the fusion's
  collaborative parts (EASE with its Markov term, item-kNN) are sums over the history's items, so
  each item's share of a recommended item's standardised score is exact and costs a gather of
  their weights (a few ms a list). It leaves out the transformer's share: removing the first
  reason it names costs the item about four fifths of the places occlusion's first reason costs
  in the served ranking (docs/benchmarks.md, "Reasons").

Items whose removal (occlusion) or share (weights) does not raise the score are no reason.

A short history's list blends recent popularity in (``inference.trending``); an item that this
brought into the list, one the artifact without the counts would not have listed, is *popular
now* (``inference.artifact.ArtifactRecommender.popular``, with how many users took it up; at least
``schemas.messages.POPULAR_MIN_USERS``, so no reason shows what one or two other users did).
Faithful by construction: it is the counterfactual itself, at one more scoring of the history.
Its history reasons stay: they are the model's share of its score.

CPU work: run it in a worker, never on an event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from schemas.messages import MAX_REASONS, POPULAR_MIN_USERS, PopularNow

if TYPE_CHECKING:  # the pool's parent imports this module and needs no scipy
    from inference.scoring import Attribution

__all__ = [
    "EXPLAINED",
    "MAX_OCCLUDED",
    "MAX_REASONS",
    "Attributable",
    "FusedScorer",
    "HistoryScorer",
    "ListReasons",
    "explain_lists",
    "occlusion_reasons",
    "weight_reasons",
]

MAX_OCCLUDED = 32
"""Only the newest this many history items are tried (one batch row each)."""


class HistoryScorer(Protocol):
    """What attribution needs of a loaded artifact (``inference.artifact.ArtifactRecommender``)."""

    index: dict[str, int]
    item_ids: list[str]

    def to_indices(self, history: list[str]) -> np.ndarray: ...

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray: ...


EXPLAINED = 100
"""Items explained per list: a regular list whole, and the head of a whole-catalog ranking that
the regeneration service refines under a conversation's constraints."""


@dataclass(frozen=True)
class ListReasons:
    """Why the items of one list were recommended.

    ``history``: item -> the history item ids behind it, largest contribution first.
    ``popular``: item -> how many users took it up in the last ``days`` days, for the items
    recent popularity brought into the list (``inference.artifact.ArtifactRecommender.popular``).
    """

    history: dict[str, list[str]]
    popular: dict[str, int] = field(default_factory=dict)
    days: int = 0

    def popular_now(self) -> dict[str, PopularNow]:
        """Each such item's ``popular`` reason as the wire says it (none below the schema's
        minimum of users, or without a window)."""
        if not 1 <= self.days <= 366:
            return {}
        return {
            item: PopularNow(users=users, days=self.days)
            for item, users in self.popular.items()
            if users >= POPULAR_MIN_USERS
        }


def explain_lists(
    model: object,
    histories: Sequence[list[str]],
    lists: Sequence[Sequence[tuple[str, float]]],
    returning: Sequence[bool] | None = None,
) -> list[ListReasons] | None:
    """Each list's reasons for its first :data:`EXPLAINED` items, from the model's
    ``explain(history, items)`` and, when it blends recent popularity, ``popular(history,
    items)`` (with ``returning=True`` for a list made again for a user who has been away);
    ``None`` for a model that cannot explain."""
    explain = getattr(model, "explain", None)
    if explain is None:
        return None
    popular = getattr(model, "popular", None)
    days = int(getattr(model, "recent_days", 0))
    out = []
    again = returning if returning is not None else [False] * len(histories)
    for history, ranked, back in zip(histories, lists, again, strict=True):
        head = [item for item, _ in ranked[:EXPLAINED]]
        lifted: dict[str, int] = {}
        if popular is not None and days > 0:
            lifted = popular(history, head, returning=True) if back else popular(history, head)
        out.append(ListReasons(explain(history, head), lifted, days if lifted else 0))
    return out


@runtime_checkable
class Attributable(Protocol):
    """A fusion part whose score is a sum over the history's items
    (``inference.scoring.EaseScorer``, ``ItemKNNScorer``)."""

    def attribute(self, history: np.ndarray, targets: np.ndarray) -> Attribution: ...


class FusedScorer(Protocol):
    """What :func:`weight_reasons` needs of a loaded artifact: the fusion's weights and parts."""

    @property
    def weights(self) -> Mapping[str, float]: ...

    @property
    def parts(self) -> Mapping[str, object]: ...


def weight_reasons(
    model: FusedScorer, history: np.ndarray, targets: np.ndarray, top: int = MAX_REASONS
) -> list[list[int]]:
    """For each target (catalog index), up to ``top`` history items (catalog indices, largest
    share first) whose weighted share of its standardised score is positive.

    Every list is empty when no part of the fusion is attributable (a transformer alone).
    """
    attributed = [
        (weight, part.attribute(history, targets))
        for name, weight in model.weights.items()
        if weight > 0.0 and isinstance(part := model.parts.get(name), Attributable)
    ]
    if not attributed:
        return [[] for _ in targets]
    items, at = np.unique(np.concatenate([a[0] for _, a in attributed]), return_inverse=True)
    shares = np.zeros((len(items), len(targets)))  # (history item, target)
    start = 0
    for weight, (part_items, part_shares) in attributed:
        np.add.at(shares, at[start : start + len(part_items)], weight * part_shares)
        start += len(part_items)
    ranked = np.argsort(-shares, axis=0, kind="stable")[:top]  # (top, target)
    return [
        [int(items[r]) for r in ranked[:, col] if shares[r, col] > 0.0]
        for col in range(len(targets))
    ]


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
