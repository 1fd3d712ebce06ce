"""Recent popularity for cold starts, in serving: what is popular now, blended into short lists.

A user with one to a few items gives the models little to go on; what other users took up lately
is a strong guess for them (docs/models.md, "Recent popularity"). The stream worker counts, per
day, each item that enters a user's profile for the first time (``streams.trending``); the
regeneration service sums the artifact's window of days (``consumers.regenerate.RecentCounts``)
and hands the counts to the worker pool, whose workers give them to the model
(:meth:`inference.artifact.ArtifactRecommender.use_recent`). For a history shorter than
``below`` items (and not empty) the served scores are then ``z(model) + weight * recent``
(:func:`blend_recent`); longer histories, and every history while no counts have arrived, get
the model's scores unchanged.

``recent`` is ``log(1 + count) / log(1 + top count)`` (``scale`` ``"top"``): from 0 for an item
nobody took up lately to 1 for the window's most taken-up item, so ``weight`` is the lift, in
standard deviations of the model's scores, of what is most popular now, on any catalog. Artifacts
trained before it have ``"z"``: ``log(1 + count)`` standardised over the whole catalog. On a
window that counts few of many items (ml-latest-small's month counts about 240 of 9,700) that
puts each counted item 9 to 12 standard deviations up, far above the model's best, whatever
their counts (``bench/trending_scale.py``): one weight meant a far stronger blend there than
on ML-100K (docs/models.md, "One scale for every catalog").

An item that the counts brought into a list (the list without them would not hold it) says so:
its reason is that users took it up lately (``ScoredItem.popular``,
``ArtifactRecommender.popular``). The read API's conversation turns blend the same counts, over
the window ending on the day of the user's newest event (``api.conversation.RecentWindows``).

A blend with ``idle_s`` set is for returning users only: a list made as the user's events are
folded gets the model alone (what they do next is what the model predicts best; the blend would
cost it, docs/models.md "The next items"), and once they have been idle ``idle_s`` seconds the
regeneration service makes their list again with the counts of that moment, then once a day
(:data:`REFRESH_EVERY_S`) while the window moves, for up to :data:`REFRESH_HORIZON_S` after their
newest event (:func:`refresh_moment`; ``consumers.regen``). ``idle_s`` 0 blends every list of a
short history, as artifacts trained before it do.

``days``, ``weight``, ``below`` and ``idle_s`` are chosen by the lab on users the model never saw
(``lab.trending``) and stored in the artifact's ``"trending"`` config section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.exceptions import ArtifactError, InferenceError
from inference.hybrid import standardise
from streams.trending import DAY_S

__all__ = [
    "REFRESH_EVERY_S",
    "REFRESH_HORIZON_S",
    "SCALES",
    "TrendingConfig",
    "blend_recent",
    "recent_counts",
    "recent_feature",
    "refresh_moment",
]

SCALES = ("top", "z")  # how log(1 + count) is put on the model's scale; the first is trained
# A returning user's list is made again this often while they stay away (the counts are kept
# per day), and not after this long past their newest event.
REFRESH_EVERY_S = DAY_S
REFRESH_HORIZON_S = 90 * DAY_S
MAX_IDLE_S = 30 * DAY_S


@dataclass(frozen=True)
class TrendingConfig:
    """How much recent popularity counts, over how many days, and for histories under ``below``.

    ``weight`` 0 or ``below`` 0 turns it off. ``scale`` is how the counts meet the model's
    scores (:func:`recent_feature`). ``idle_s`` > 0 serves it only to lists made again for a user
    idle that long (:func:`refresh_moment`); 0 to every list of a short history. ``gain``,
    ``next_gain`` and ``served_next_gain`` are the held-out mean NDCG@10 changes the lab chose
    the blend by: on later items and on the next ones, judged with EASE, and on the next ones
    judged with the served model fitted without those users (for the record only).
    """

    days: int = 0
    weight: float = 0.0
    below: int = 0
    scale: str = SCALES[0]
    idle_s: int = 0
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
        if self.scale not in SCALES:
            raise InferenceError(f"trending scale {self.scale!r} is not one of {SCALES}")
        if not 0 <= self.idle_s <= MAX_IDLE_S:
            raise InferenceError(f"trending idle_s {self.idle_s} is not within 0..{MAX_IDLE_S}")

    @property
    def active(self) -> bool:
        return self.weight > 0.0 and self.below > 0

    def applies(self, history_length: int, returning: bool = False) -> bool:
        """Whether a history of this many known items gets the blend (an empty one never does),
        in a list made as its events are folded or, ``returning``, made again for a user idle
        ``idle_s`` since (:func:`refresh_moment`)."""
        return self.active and 0 < history_length < self.below and (returning or not self.idle_s)

    @property
    def refreshes(self) -> bool:
        """Whether returning users' lists are made again for the blend (``idle_s`` > 0)."""
        return self.active and self.idle_s > 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "days": self.days,
            "weight": self.weight,
            "below": self.below,
            "scale": self.scale,
            "idle_s": self.idle_s,
        }
        if self.gain is not None:
            out["heldout_gain"] = self.gain
        if self.next_gain is not None:
            out["heldout_next_gain"] = self.next_gain
        if self.served_next_gain is not None:
            out["heldout_served_next_gain"] = self.served_next_gain
        return out

    @classmethod
    def from_json(cls, section: Any) -> TrendingConfig:
        """The config of an artifact's ``"trending"`` section (else :class:`ArtifactError`); one
        without ``"scale"`` was trained with ``"z"``, one without ``"idle_s"`` blends every list."""
        try:
            days = section["days"]
            if not isinstance(days, int) or isinstance(days, bool):
                raise TypeError(f"days must be a whole number, not {days!r}")
            scale = section.get("scale", "z")
            if not isinstance(scale, str):
                raise TypeError(f"scale must be a string, not {scale!r}")
            idle_s = section.get("idle_s", 0)
            if not isinstance(idle_s, int) or isinstance(idle_s, bool):
                raise TypeError(f"idle_s must be a whole number, not {idle_s!r}")
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
                days=days,
                weight=float(section["weight"]),
                below=int(section["below"]),
                scale=scale,
                idle_s=idle_s,
                **record,
            )
        except (KeyError, TypeError, ValueError, InferenceError) as exc:
            raise ArtifactError(f"malformed trending section: {exc}") from exc


def refresh_moment(last: float, at: float, idle_s: float) -> float | None:
    """When the list a user sees at ``at`` was last made again, for a user whose newest event
    was at ``last`` (seconds): first ``idle_s`` after it, then every :data:`REFRESH_EVERY_S`,
    none later than :data:`REFRESH_HORIZON_S` after it. ``None`` while the list made at ``last``
    still stands (``at`` within ``idle_s`` of it), and always for ``idle_s`` 0."""
    if idle_s <= 0 or at - last < idle_s:
        return None
    last_step = (REFRESH_HORIZON_S - idle_s) // REFRESH_EVERY_S
    steps = min((at - last - idle_s) // REFRESH_EVERY_S, max(last_step, 0))
    return float(last + idle_s + steps * REFRESH_EVERY_S)


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


def recent_feature(logs: np.ndarray, scale: str) -> np.ndarray:
    """Rows of ``log(1 + count)`` per catalog item put on the scale ``weight`` multiplies: each
    row over its largest value (``"top"``: 0 to 1, a row without counts stays 0), or
    standardised over the catalog (``"z"``)."""
    rows = np.asarray(logs, dtype=np.float64)
    if scale == "z":
        return standardise(rows)
    if scale != "top":
        raise InferenceError(f"trending scale {scale!r} is not one of {SCALES}")
    top = rows.max(axis=-1, keepdims=True)
    out: np.ndarray = rows / np.where(top > 0.0, top, 1.0)
    return out


def blend_recent(base: np.ndarray, recent: np.ndarray, weight: float) -> np.ndarray:
    """``z(base) + weight * recent``: the model's score rows with recent popularity added
    (``recent``: :func:`recent_feature`'s rows, one for all or one per row of ``base``)."""
    z = standardise(np.asarray(base, dtype=np.float32))
    return (z + weight * recent).astype(np.float32)
