"""The training plan: one time budget that the phases of ``recstream train`` share.

``recstream train`` runs, in order: the hyper-parameter search (datasets without a preset), the
transformer, then the fits after it (EASE, item-kNN and popularity tuned on validation, the
fusion's weights, retrieval, the recent-popularity blend chosen on held-out users).
:func:`plan_training` sizes each phase from the data instead of fixed defaults:

- a dataset without a preset gets ``--budget-minutes`` (default :data:`BUDGET_MINUTES`) in all:
  the search takes :data:`SEARCH_MINUTES` (at most :data:`SEARCH_SHARE` of the budget), 40 % for
  EASE and item-kNN and 60 % for the transformer's trials, unless a trial would not hold a few
  epochs (a large catalog on CPU), in which case the transformer keeps its preset and its share
  goes to its training; the fits after the transformer are estimated from the catalog and the
  validation users and reserved, and the transformer trains until the budget less that reserve
  is spent (so whatever an earlier phase leaves unused goes to it), less :data:`JUDGE_SHARE` of
  its time, which trains it a second time without a fold of users to judge the recent-popularity
  blend as it is served;
- the named MovieLens sets keep the plan their presets were chosen with: no search, the
  transformer capped at :data:`PRESET_GEN_MINUTES` (early stopping usually ends it sooner), EASE
  exact (their catalogs are under the bound); its second training may take as long as its first;
- EASE is solved for at most :func:`ease_bound` items: its dense inverse must fit in
  :data:`EASE_MEMORY_BYTES` and the inverses the fits need must fit in the reserve.

The plan is printed before training and recorded in ``training.json`` (with the seconds each
phase took), so an artifact says what it was given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lab.protocol import Split

__all__ = [
    "BUDGET_MINUTES",
    "PRESET_GEN_MINUTES",
    "TrainingPlan",
    "ease_bound",
    "estimate_fit_seconds",
    "plan_training",
]

# The whole of `recstream train` for a dataset without a preset: on the 25,000-item synthetic
# shop (300,000 interactions) train and `recstream eval` of every model then fit in 15 minutes
# on this 2-core machine under the load of shared use.
BUDGET_MINUTES = 8.0
PRESET_GEN_MINUTES = 14.0  # the transformer's cap on the named sets (as their presets were run)
SEARCH_MINUTES = 4.0  # the most the search takes
SEARCH_SHARE = 0.6  # of the budget, the most the search takes
SAMPLED_ABOVE = 10_000  # catalog size above which the transformer trains on a sampled softmax
SAMPLED_NEGATIVES = 2048
# EASE's closed form inverts a dense float32 matrix of the solved items; the fit holds about
# five arrays of that size at once (Gram matrix, factor, inverse, its symmetric copy, weights).
EASE_MEMORY_BYTES = 2 * 1024**3
EASE_ARRAYS = 5
# EASE's fit (Gram matrix and one Cholesky inverse) of 9,283 items took 58 s on this 2-core
# machine under load (load average 5; 25 s for 10,000 items at load 2.6); the cost grows with
# the cube of the size. Each inverse may take a 30th of the budget (three per fit, a tenth).
EASE_SECONDS_AT_10K = 60.0
EASE_INVERSES = 3  # the evaluation grid's lam values: the fits re-solve once per value
# Scoring one validation user x catalog item (scores, masking, ranking) in the grids and the
# fusion: 5,000 users x 25,000 items took about 2.3 s per grid point; the fusion's fit on the
# synthetic shop (40 M cells) took 26 s.
SECONDS_PER_CELL = 2e-8
GRID_POINTS = 27 + 15  # the EASE and item-kNN grids (lab.evaluate.GRIDS)
FUSION_JUDGED = 40  # weight sets the fusion's coordinate ascent judges, typically
MIN_GEN_SECONDS = 60.0  # the transformer gets at least this much whatever the estimate
TRENDING_FOLDS = 5  # lab.trending.heldout_grid's folds and targets, as `recstream train` runs it
TRENDING_TARGETS = 10
# The recent-popularity blend is also judged with the served model fitted without one fold's
# users: its transformer is trained a second time, on the other folds' users. With an overall
# budget that second training gets this share of the transformer's time, taken from the first.
JUDGE_SHARE = 0.25


@dataclass(frozen=True)
class TrainingPlan:
    """What each phase of ``recstream train`` may spend, decided before it starts.

    ``budget_s`` is the whole run's budget (``None``: the preset plan, whose transformer cap is
    ``gen_s`` and whose fits are not counted against it). ``gen_s`` is the transformer's share
    as planned; with a budget it trains until ``budget_s - fit_s - judge_s`` seconds after the
    start. ``judge_s`` caps the second training of the transformer that judges the
    recent-popularity blend as served (0: none); it never trains longer than the first did.
    """

    budget_s: float | None
    search_cf_s: float
    search_gen_s: float
    gen_s: float
    fit_s: float
    ease_max_items: int
    negatives: int
    source: str  # "preset", "budget" or "given" (the transformer's minutes set on the command line)
    judge_s: float = 0.0

    @property
    def search_s(self) -> float:
        return self.search_cf_s + self.search_gen_s

    def gen_deadline(self, elapsed_s: float) -> float:
        """Seconds the transformer may train when it starts ``elapsed_s`` into the run."""
        if self.budget_s is None or self.source == "given":
            return self.gen_s
        return max(MIN_GEN_SECONDS, self.budget_s - self.fit_s - self.judge_s - elapsed_s)

    def to_json(self) -> dict[str, Any]:
        fields = {**asdict(self), "search_s": self.search_s}
        return {k: (round(v, 1) if isinstance(v, float) else v) for k, v in fields.items()}

    def describe(self) -> str:
        """One line for the start of training."""
        total = (
            f"budget {self.budget_s / 60:.1f} min"
            if self.budget_s is not None
            else "preset plan (no overall budget)"
        )
        return (
            f"plan ({self.source}): {total}; search {self.search_cf_s:.0f}s CF + "
            f"{self.search_gen_s:.0f}s transformer trials, transformer "
            f"{self.gen_s:.0f}s, fits after it ~{self.fit_s:.0f}s (and up to "
            f"{self.judge_s:.0f}s training it again to judge recent popularity); EASE on "
            f"{self.ease_max_items:,} items; sampled negatives {self.negatives}"
        )


def ease_bound(n_items: int, seconds: float | None = None, inverses: int = EASE_INVERSES) -> int:
    """Items EASE is solved for: all of them, unless the inverse outgrows
    :data:`EASE_MEMORY_BYTES` or ``inverses`` of them outlast ``seconds``."""
    by_memory = int(math.sqrt(EASE_MEMORY_BYTES / (4 * EASE_ARRAYS)))
    bound = min(n_items, by_memory)
    if seconds is not None:
        per_inverse = seconds / max(inverses, 1)
        by_time = int(10_000 * (per_inverse / EASE_SECONDS_AT_10K) ** (1 / 3))
        bound = min(bound, max(by_time, 1_000))
    return max(1, bound)


def estimate_fit_seconds(split: Split, ease_items: int, *, grids: bool = True) -> float:
    """Seconds the fits after the transformer take: EASE's inverses, the validation grids, the
    fusion's weight search and recent popularity's held-out choice (a rough figure for this
    2-core machine)."""
    from lab.baselines import TUNE_USERS
    from lab.hybrid import FUSION_CELLS
    from lab.trending import DAYS, HELDOUT_CELLS, NEXT_ITEMS, PREFIXES, WEIGHTS

    users = len(split.eval_users)
    inverses = EASE_INVERSES if grids else 1
    ease = inverses * EASE_SECONDS_AT_10K * (ease_items / 10_000) ** 3
    grid = (GRID_POINTS if grids else 0) * min(users, TUNE_USERS) * split.n_items
    fusion = FUSION_JUDGED * min(users * split.n_items, FUSION_CELLS)
    # Recent popularity's held-out choice, on later items and on the next ones: EASE once per
    # fold for each, and each prefix's pairs judged for the model alone and every blend.
    heldout = min(len(split.train) * TRENDING_TARGETS * split.n_items, HELDOUT_CELLS)
    heldout += min(len(split.train) * NEXT_ITEMS * split.n_items, HELDOUT_CELLS)
    trending = 2 * TRENDING_FOLDS * EASE_SECONDS_AT_10K * (ease_items / 10_000) ** 3
    trending_cells = heldout * len(PREFIXES) * (1 + len(DAYS) * len(WEIGHTS))
    return ease + trending + SECONDS_PER_CELL * (grid + fusion + trending_cells)


def plan_training(
    split: Split,
    *,
    preset: bool,
    budget_minutes: float | None = None,
    gen_minutes: float | None = None,
    tune_minutes: float | None = None,
    ease_max_items: int | None = None,
    negatives: int | None = None,
    hybrid: bool = True,
) -> TrainingPlan:
    """The plan for ``split`` (see the module docstring); each argument given overrides its part.

    ``preset``: the dataset is one of the named sets, whose default plan is the preset one.
    """
    if negatives is None:
        negatives = SAMPLED_NEGATIVES if split.n_items > SAMPLED_ABOVE else 0
    if budget_minutes is None and preset:
        items = ease_max_items if ease_max_items is not None else ease_bound(split.n_items)
        cf_s, gen_search_s = _search_shares(split, (tune_minutes or 0.0) * 60, negatives, hybrid)
        gen_s = (gen_minutes if gen_minutes is not None else PRESET_GEN_MINUTES) * 60
        return TrainingPlan(
            budget_s=None,
            search_cf_s=cf_s,
            search_gen_s=gen_search_s,
            gen_s=gen_s,
            fit_s=estimate_fit_seconds(split, items) if hybrid else 0.0,
            ease_max_items=items,
            negatives=negatives,
            source="preset" if gen_minutes is None else "given",
            judge_s=gen_s if hybrid else 0.0,
        )
    budget_s = (budget_minutes if budget_minutes is not None else BUDGET_MINUTES) * 60
    if tune_minutes is not None:
        search_s = tune_minutes * 60
    else:
        search_s = min(SEARCH_MINUTES * 60, SEARCH_SHARE * budget_s)
    cf_s, gen_search_s = _search_shares(split, search_s, negatives, hybrid)
    search_s = cf_s + gen_search_s
    # The fits get what their inverses and grids cost, bounded so the transformer keeps most.
    items = (
        ease_max_items
        if ease_max_items is not None
        else ease_bound(split.n_items, seconds=0.1 * budget_s)
    )
    fit_s = estimate_fit_seconds(split, items, grids=search_s == 0) if hybrid else 0.0
    if gen_minutes is not None:
        gen_s, source = gen_minutes * 60, "given"
        judge_s = gen_s
    else:
        both = max(MIN_GEN_SECONDS, budget_s - search_s - fit_s)
        judge_s = JUDGE_SHARE * both if hybrid else 0.0
        gen_s, source = max(MIN_GEN_SECONDS, both - judge_s), "budget"
    return TrainingPlan(
        budget_s=budget_s,
        search_cf_s=cf_s,
        search_gen_s=gen_search_s,
        gen_s=gen_s,
        fit_s=fit_s,
        ease_max_items=items,
        negatives=negatives,
        source=source,
        judge_s=judge_s if hybrid else 0.0,
    )


def _search_shares(
    split: Split, search_s: float, negatives: int, hybrid: bool
) -> tuple[float, float]:
    """``(CF, transformer)`` seconds of the search: the transformer's share is 0 when its trials
    would be too short to say anything, the CF share 0 without the hybrid's CF parts."""
    from lab.tuning import gen_trials_fit, split_budget

    cf_s, gen_s = split_budget(search_s)
    if not gen_trials_fit(split, gen_s, negatives):
        gen_s = 0.0
    return (cf_s if hybrid else 0.0), gen_s
