"""Recent popularity for cold starts, and the held-out-user protocol that chooses its blend.

Recent popularity ("trending") is what a live system can count and the models do not see: other
users' interactions with each item in the ``days`` before a moment, ``log(1 + count)``. For a
user with a very short history it is blended into the model's scores as
``z(model) + weight * recent``, ``recent`` being ``log(1 + count)`` over the window's largest
(:func:`inference.trending.blend_recent`, scale ``"top"``): the weight is the lift of the most
taken-up item in standard deviations of the model's scores, on any catalog.

Choosing ``days`` and ``weight`` on the leave-one-out validation prefixes does not work: one
target per user makes a prefix's NDCG@10 too noisy to tell +10 % from nothing, and the model has
been trained on those very users, which favours it (docs/models.md, "Cold start").
:func:`heldout_grid` judges the blend on users the model never saw instead: the users are cut
into folds, a model is fitted without each fold (``fit``, e.g. EASE with its tuned settings), and
each held-out user's first ``n`` training items predict each of their last ``targets`` training
items, with recent popularity counted up to that item's own moment. That gives about ten targets
per user where the protocol has one, and no memorised user.

A blend may also be kept for returning users (``idle`` > 0, :data:`IDLES`): a target that comes
within ``idle`` seconds of the prefix's last item is shown the list made then, the model's alone;
a later one the list made again while the user was away, with the counts of that moment
(:func:`inference.trending.refresh_moment`), as the regeneration service serves it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from inference.hybrid import standardise
from inference.scoring import CatalogScorer
from inference.trending import SCALES, recent_feature, refresh_moment
from lab.datasets import Dataset
from lab.protocol import Split, ndcg_per_user, target_ranks
from streams.trending import DAY_S  # the day the stream worker counts by

__all__ = [
    "DAYS",
    "DAY_S",
    "IDLES",
    "NEXT_ITEMS",
    "NEXT_TOLERANCE",
    "PREFIXES",
    "SCALE",
    "WEIGHTS",
    "RecentPopularity",
    "TrendingChoice",
    "at_targets",
    "choose",
    "heldout_grid",
    "prefix_changes",
]

PREFIXES = (1, 2, 3)  # the cold-start histories a blend is chosen for (and served to)
# The blends :func:`heldout_grid` tries: window in days, weight of recent popularity (the most
# taken-up item's lift in standard deviations of the model's scores).
DAYS = (1.0, 3.0, 7.0, 30.0)
WEIGHTS = (1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0)
# How long a user must have been away for their list to get the blend (seconds; 0: every list).
IDLES = (0.0, 3_600.0, float(DAY_S))
SCALE = SCALES[0]  # what the lab chooses blends with, and training writes
CELLS = 4_000_000  # scores held at once by heldout_grid (rows x items)
LATER_ITEMS = 10  # the later items a blend is judged on (each user's last training items)
NEXT_ITEMS = 3  # the next items a blend must not cost (heldout_grid(upcoming=True))
# A loss on the next items that :func:`choose`'s guards let pass whatever its standard error: one
# target of a few hundred moving down a few places, too small to protect anyone from.
NEXT_TOLERANCE = 0.01
# Held-out users x targets x items judged per prefix and blend, at most: every user of ML-100K
# (16 M) and ml-latest-small (59 M); a larger set judges an evenly spaced share of its users.
HELDOUT_CELLS = 60_000_000

Cell = tuple[int, float, float, float]  # a grid's key: prefix, days, weight, idle


class RecentPopularity:
    """Other users' interactions per item in a window before a moment, from the time-ordered
    interactions (a binary search and a count per query)."""

    def __init__(self, ds: Dataset, split: Split) -> None:
        users = {u: n for n, u in enumerate(split.user_ids)}
        rows = [(it.ts, split.item_index[it.item_id], users[it.user_id]) for it in ds.interactions]
        rows.sort(key=lambda r: r[0])
        self.ts = np.asarray([r[0] for r in rows], dtype=np.float64)
        self.item = np.asarray([r[1] for r in rows], dtype=np.int64)
        self.user = np.asarray([r[2] for r in rows], dtype=np.int64)
        self.n_items = split.n_items
        # Each user's interaction times in the split's order (time, ties in file order): the
        # training items, then the validation and the test item.
        self.times: list[list[float]] = [[] for _ in split.user_ids]
        for it in ds.interactions:
            self.times[users[it.user_id]].append(it.ts)

    def scores(
        self, user: int, until: float, days: float, *, inclusive: bool = False
    ) -> np.ndarray:
        """``log(1 + count)`` per item of the others' interactions in ``[until - days, until)``
        (``until`` itself included when ``inclusive``); none of ``user``'s own."""
        counts = self.counts(user, until - days * DAY_S, until, inclusive=inclusive)
        return np.log1p(counts.astype(np.float64))

    def counts(
        self, user: int, since: float, until: float, *, inclusive: bool = False
    ) -> np.ndarray:
        """Per item, the others' interactions in ``[since, until)`` (``until`` itself included
        when ``inclusive``); none of ``user``'s own."""
        lo = np.searchsorted(self.ts, since, side="left")
        hi = np.searchsorted(self.ts, until, side="right" if inclusive else "left")
        others = self.user[lo:hi] != user
        counts: np.ndarray = np.bincount(self.item[lo:hi][others], minlength=self.n_items)
        return counts


@dataclass(frozen=True)
class TrendingChoice:
    """The blend :func:`choose` picked and its mean relative NDCG@10 change over the prefixes:
    on the later targets (``gain``) and on the next items by each guard (``next_gains``, in the
    order :func:`choose` was given them). ``idle``: served to lists made again for users away
    that long (seconds; 0: to every list)."""

    days: float
    weight: float
    gain: float
    next_gains: tuple[float, ...] = ()
    scale: str = SCALE
    idle: float = 0.0

    @property
    def next_gain(self) -> float | None:
        """The first guard's change on the next items (``None`` without a guard)."""
        return self.next_gains[0] if self.next_gains else None


def heldout_grid(  # noqa: PLR0917 - the protocol's knobs, all named at the call
    split: Split,
    recent: RecentPopularity,
    fit: Callable[[Split], CatalogScorer],
    prefixes: Sequence[int],
    days: Sequence[float],
    weights: Sequence[float],
    folds: int = 5,
    targets: int = LATER_ITEMS,
    *,
    upcoming: bool = False,
    judged_folds: int | None = None,
    idles: Sequence[float] = (0.0,),
) -> dict[Cell, np.ndarray]:
    """NDCG@10 per (held-out user, target) for the model alone (``days`` = ``weight`` = ``idle``
    = 0) and for each blend, keyed ``(n, days, weight, idle)``.

    User ``u`` is in fold ``u % folds``; each fold's model is fitted on the others' training
    items only. A user takes part with at least ``max(prefixes) + 1`` training items; their
    targets are the last ``targets`` training items after the prefix, the prefix masked, each
    with recent popularity up to its own moment. With ``upcoming`` they are instead the next
    ``targets`` items after the prefix, with recent popularity up to the prefix's last item
    (included): what a live list, made when that item was folded, is shown for. With ``idle`` >
    0 a blend reaches only the targets ``idle`` or more after the prefix's last item, with the
    counts of the list's last remaking before them (:func:`inference.trending.refresh_moment`),
    upcoming or not. Users are
    scored a few at a time, so a large catalog holds at most :data:`CELLS` scores at once, and
    every ``stride``-th of them takes part so that at most :data:`HELDOUT_CELLS` are judged.
    ``judged_folds`` (default: all) judges only the first few folds, for a model too costly to
    fit ``folds`` times (the served fusion, whose transformer is trained again per fold).
    """
    empty = np.zeros(0, dtype=np.int64)
    out: dict[Cell, list[np.ndarray]] = {}
    need = max(prefixes) + 1
    step = max(1, CELLS // (targets * max(split.n_items, 1)))
    eligible = sum(len(seq) >= need for seq in split.train)
    judged = max(1, HELDOUT_CELLS // (targets * max(split.n_items, 1)))
    stride = max(1, -(-eligible // judged))
    for f in range(folds if judged_folds is None else min(judged_folds, folds)):
        part = replace(
            split, train=[empty if u % folds == f else s for u, s in enumerate(split.train)]
        )
        model = fit(part)
        users = [u for u in range(f, len(split.train), folds) if len(split.train[u]) >= need]
        users = users[::stride]
        for s in range(0, len(users), step):
            for n in prefixes:
                chunk = users[s : s + step]
                blends = (days, weights, idles)
                _judge(out, model, split, recent, chunk, n, blends, targets, upcoming)
    return {key: np.concatenate(parts) for key, parts in out.items()}


def _judge(  # noqa: PLR0917 - one step of heldout_grid, its loop variables
    out: dict[Cell, list[np.ndarray]],
    model: CatalogScorer,
    split: Split,
    recent: RecentPopularity,
    users: Sequence[int],
    n: int,
    blends: tuple[Sequence[float], Sequence[float], Sequence[float]],
    targets: int,
    upcoming: bool,
) -> None:
    """:func:`heldout_grid` for ``users`` on their first ``n`` items and every blend of
    ``(days, weights, idles)``: appends to ``out``."""
    base = standardise(model.score([split.train[u][:n] for u in users]))
    rows, items, moments = [], [], []
    for i, u in enumerate(users):
        seq = split.train[u]
        judged = range(n, n + targets) if upcoming else range(len(seq) - targets, len(seq))
        for j in judged:
            if n <= j < len(seq):
                rows.append(i)
                items.append(seq[j])
                moments.append((u, recent.times[u][n - 1], recent.times[u][j]))
    hist = [split.train[users[i]][:n] for i in rows]
    model_z = base[rows]
    goal = np.asarray(items, dtype=np.int64)
    alone = ndcg_per_user(target_ranks(model_z, hist, goal))
    out.setdefault((n, 0.0, 0.0, 0.0), []).append(alone)
    days, weights, idles = blends
    for idle in idles:
        for d in days:
            fresh = recent_feature(
                np.stack([_counted(recent, m, d, idle, upcoming) for m in moments]), SCALE
            )
            for w in weights:
                ranks = target_ranks(model_z + w * fresh, hist, goal)
                out.setdefault((n, float(d), float(w), float(idle)), []).append(
                    ndcg_per_user(ranks)
                )


def _counted(
    recent: RecentPopularity,
    moment: tuple[int, float, float],
    days: float,
    idle: float,
    upcoming: bool,
) -> np.ndarray:
    """The recent popularity the list shown for one target blends: ``moment`` is the user,
    the prefix's last item's time and the target's. Without ``idle``, counted up to the
    prefix's last item (included) when ``upcoming``, else up to the target; with it, up to the
    list's last remaking before the target, none when the prefix's list still stands."""
    user, last, at = moment
    if not idle:
        return recent.scores(user, last if upcoming else at, days, inclusive=upcoming)
    remade = refresh_moment(last, at, idle)
    if remade is None:
        return np.zeros(recent.n_items, dtype=np.float64)
    return recent.scores(user, remade, days)


def choose(
    grid: dict[Cell, np.ndarray],
    prefixes: Sequence[int],
    days: Sequence[float],
    weights: Sequence[float],
    z: float = 2.0,
    *,
    guards: Sequence[dict[Cell, np.ndarray]] = (),
    idles: Sequence[float] = (0.0,),
) -> TrendingChoice:
    """The ``(days, weight, idle)`` with the largest mean relative NDCG@10 change over
    ``prefixes``,
    among the blends whose gain is at least ``z`` standard errors (per-pair changes, each
    relative to its prefix's mean, pooled) and that, by every ``guards`` grid (the next items,
    ``heldout_grid(upcoming=True)``, e.g. of EASE and of the served model), lose no more than
    one standard error, or :data:`NEXT_TOLERANCE`, on any prefix: a blend that helps the later
    items must not cost the very next ones. (A returning users' blend changes only the few next
    items that come after a break; with one of them a place lower, the loss is its own standard
    error, however small.) Weight 0 (no blend) when none qualifies; of equal gains, the first
    of ``idles`` (serving every list needs no remaking)."""
    best = TrendingChoice(days=0.0, weight=0.0, gain=0.0)
    for idle in idles:
        for d in days:
            for w in weights:
                cell = (float(d), float(w), float(idle))
                changes, sure = _changes(grid, prefixes, *cell, z)
                gain = float(np.mean([c for c, _ in changes]))
                ahead = [_changes(g, prefixes, *cell, z)[0] for g in guards]
                costs = any(c < -max(se, NEXT_TOLERANCE) for each in ahead for c, se in each)
                if sure and gain > best.gain and not costs:
                    next_gains = tuple(float(np.mean([c for c, _ in each])) for each in ahead)
                    best = TrendingChoice(*cell[:2], gain, next_gains, idle=cell[2])
    return best


def prefix_changes(
    grid: dict[Cell, np.ndarray],
    prefixes: Sequence[int],
    days: float,
    weight: float,
    idle: float = 0.0,
) -> list[tuple[float, float]]:
    """A blend's mean relative NDCG@10 change on each prefix of ``grid``, with its standard
    error (what :func:`choose`'s guards compare)."""
    return _changes(grid, prefixes, float(days), float(weight), float(idle), 0.0)[0]


def _changes(  # noqa: PLR0917 - one cell of the grid
    grid: dict[Cell, np.ndarray],
    prefixes: Sequence[int],
    d: float,
    w: float,
    idle: float,
    z: float,
) -> tuple[list[tuple[float, float]], bool]:
    """A blend's relative change on each prefix with its standard error, and whether their mean
    is ``z`` standard errors above zero (per-pair changes, each relative to its prefix's mean,
    pooled)."""
    alone = {n: grid[n, 0.0, 0.0, 0.0] for n in prefixes}
    base = {n: max(float(alone[n].mean()), 1e-12) for n in prefixes}
    diffs = {n: (grid[n, d, w, idle] - alone[n]) / base[n] for n in prefixes}
    changes = [
        (float(diffs[n].mean()), float(diffs[n].std() / np.sqrt(max(len(diffs[n]), 1))))
        for n in prefixes
    ]
    pairs = np.concatenate(list(diffs.values()))
    return changes, bool(pairs.mean() > z * pairs.std() / np.sqrt(max(len(pairs), 1)))


def at_targets(  # noqa: PLR0917 - the protocol's view, all named at the call
    recent: RecentPopularity,
    split: Split,
    stage: str,
    rows: np.ndarray,
    days: float,
    idle: float = 0.0,
    prefix: int = 1,
) -> np.ndarray:
    """Recent popularity for the protocol's ``stage`` targets of the evaluated users at ``rows``
    (as :meth:`lab.protocol.Split.prefix_histories` returns them), each counted up to its
    target's own moment: what a live system knows when that user asks. With ``idle``, up to the
    list's last remaking before the target for users away that long after their ``prefix``-th
    item (zeros for the others: their list is the one made at that item)."""
    position = -2 if stage == "valid" else -1
    users = split.eval_users[rows]
    return np.stack(
        [
            _counted(
                recent,
                (u, recent.times[u][prefix - 1], recent.times[u][position]),
                days,
                idle,
                False,
            )
            for u in users
        ]
    )
