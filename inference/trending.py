"""Recent popularity for cold starts, in serving: what is popular now, blended into short lists.

A user with one to a few items gives the models little to go on; what other users took up lately
is a strong guess for them (docs/models.md, "Recent popularity"). The stream worker counts, per
day, each item that enters a user's profile for the first time (``streams.trending``); the
regeneration service sums the artifact's window of days (``consumers.regenerate.RecentCounts``)
and hands the counts to the worker pool, whose workers give them to the model
(:meth:`inference.artifact.ArtifactRecommender.use_recent`). For a history shorter than
``below`` items (and not empty) the served scores are then ``z(model) + weight * z(log(1 +
count))`` (:func:`inference.hybrid.blend`); longer histories, and every history while no counts
have arrived, get the model's scores unchanged.

An item that the counts brought into a list (the list without them would not hold it) says so:
its reason is that users took it up lately (``ScoredItem.popular``,
``ArtifactRecommender.popular``). The read API's conversation turns blend the same counts, over
the window ending on the day of the user's newest event (``api.conversation.RecentWindows``).

``days``, ``weight`` and ``below`` are chosen by the lab on users the model never saw
(``lab.trending``) and stored in the artifact's ``"trending"`` config section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.exceptions import ArtifactError, InferenceError

__all__ = ["TrendingConfig", "recent_counts"]


@dataclass(frozen=True)
class TrendingConfig:
    """How much recent popularity counts, over how many days, and for histories under ``below``.

    ``weight`` 0 or ``below`` 0 turns it off. ``gain``, ``next_gain`` and ``served_next_gain``
    are the held-out mean NDCG@10 changes the lab chose the blend by: on later items and on the
    next ones, judged with EASE, and on the next ones judged with the served model fitted
    without those users (for the record only).
    """

    days: int = 0
    weight: float = 0.0
    below: int = 0
    gain: float | None = None
    next_gain: float | None = None
    served_next_gain: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0.0):
            raise InferenceError(f"trending weight must be finite and >= 0, not {self.weight}")
        if self.below < 0 or self.days < 0 or self.days > 366:
            raise InferenceError(f"trending days {self.days}, below {self.below}: out of range")
        if self.weight > 0.0 and self.below > 0 and self.days == 0:
            raise InferenceError("an active trending blend needs a window of at least one day")

    @property
    def active(self) -> bool:
        return self.weight > 0.0 and self.below > 0

    def applies(self, history_length: int) -> bool:
        """Whether a history of this many known items gets the blend (an empty one never does)."""
        return self.active and 0 < history_length < self.below

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"days": self.days, "weight": self.weight, "below": self.below}
        if self.gain is not None:
            out["heldout_gain"] = self.gain
        if self.next_gain is not None:
            out["heldout_next_gain"] = self.next_gain
        if self.served_next_gain is not None:
            out["heldout_served_next_gain"] = self.served_next_gain
        return out

    @classmethod
    def from_json(cls, section: Any) -> TrendingConfig:
        """The config of an artifact's ``"trending"`` section (else :class:`ArtifactError`)."""
        try:
            days = section["days"]
            if not isinstance(days, int) or isinstance(days, bool):
                raise TypeError(f"days must be a whole number, not {days!r}")
            record = {
                field: float(section[key])
                for field, key in (
                    ("gain", "heldout_gain"),
                    ("next_gain", "heldout_next_gain"),
                    ("served_next_gain", "heldout_served_next_gain"),
                )
                if section.get(key) is not None
            }
            return cls(
                days=days, weight=float(section["weight"]), below=int(section["below"]), **record
            )
        except (KeyError, TypeError, ValueError, InferenceError) as exc:
            raise ArtifactError(f"malformed trending section: {exc}") from exc


def recent_counts(
    counts: Mapping[str, float], index: Mapping[str, int], n_items: int
) -> np.ndarray:
    """The count per catalog position (0 where none); an id outside the catalog, and a count
    that is not a finite number >= 0, are ignored (the counts come from another process)."""
    out = np.zeros(n_items, dtype=np.float64)
    for item, value in counts.items():
        pos = index.get(item)
        if pos is None or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        try:
            number = float(value)
        except OverflowError:  # an int beyond any float: no count Redis could hold
            continue
        if math.isfinite(number) and number > 0:
            out[pos] = number
    return out
