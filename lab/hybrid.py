"""The evaluated hybrid of the generative transformer and collaborative filtering.

The two models draw on different evidence (EASE on co-occurrence, the transformer on order).
Fitting picks ``alpha`` of :func:`inference.hybrid.mix` on validation NDCG@10 only; 0 and 1 are in
the grid, so the hybrid falls back to a single component when mixing does not help.
:func:`fit_retrieval` picks the cold-start retrieval's weight and history threshold
(:mod:`inference.retrieval`) on the validation targets of short history prefixes, the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from inference.hybrid import blend, fuse, mix, standardise
from inference.retrieval import RetrievalConfig, TextRetrieval
from inference.scoring import CatalogScorer
from lab.baselines import Ranker
from lab.protocol import Split, metrics_from_ranks, target_ranks

__all__ = [
    "ALPHAS",
    "COMPONENTS",
    "FIT_PREFIXES",
    "FUSION_STEPS",
    "RETRIEVAL_WEIGHTS",
    "Fusion",
    "Hybrid",
    "fit_retrieval",
    "search_weights",
    "seen_cells",
    "standardised_scores",
    "validation_sample",
]

ALPHAS = tuple(round(a, 1) for a in np.linspace(0.0, 1.0, 11))
RETRIEVAL_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 1.0)
FIT_PREFIXES = (1, 2, 3, 4, 5)  # retrieval's threshold is one past the longest prefix it serves
COMPONENTS = ("gen", "ease", "itemknn", "pop")  # the fusion's parts, in the order they are named
FUSION_STEPS = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0)  # weights tried per part, the best single at 1
FUSION_CELLS = 40_000_000  # validation users x items the fusion fit holds per component


def validation_sample(
    split: Split, n_items: int, max_cells: int
) -> tuple[list[np.ndarray], np.ndarray]:
    """The validation histories and targets a fit scores: every user, or above ``max_cells``
    users x items an evenly spaced sample of them (at least 200)."""
    hist, targets = split.histories("valid"), split.targets("valid")
    if not hist:
        raise ValueError("no user has a validation item (3+ interactions) to fit on")
    cap = max(200, max_cells // max(n_items, 1))
    if len(hist) > cap:
        rows = np.unique(np.linspace(0, len(hist) - 1, cap).astype(np.int64))
        hist, targets = [hist[r] for r in rows], targets[rows]
    return hist, targets


class Hybrid(Ranker):
    """Per-user standardised score fusion of a CF model and the generative model."""

    def __init__(self, cf: CatalogScorer, gen: CatalogScorer, alpha: float = 0.5) -> None:
        if cf.n_items and gen.n_items and cf.n_items != gen.n_items:
            raise ValueError("both components must score the same catalog")
        self.cf, self.gen, self.alpha = cf, gen, alpha
        self.n_items = cf.n_items or gen.n_items
        self.name = f"{gen.name}+{cf.name}"
        self.valid_ndcg: dict[float, float] = {}

    def fit(self, split: Split) -> Hybrid:
        """The components are fitted already; fitting the hybrid picks ``alpha`` on validation.

        Above :data:`FUSION_CELLS` validation users x items, an evenly spaced sample of users
        judges (as for :class:`Fusion`), so a large catalog does not hold gigabytes of scores.
        """
        hist, targets = validation_sample(split, self.n_items, FUSION_CELLS)
        cf = np.concatenate([self.cf.score(hist[s : s + 256]) for s in range(0, len(hist), 256)])
        gen = np.concatenate([self.gen.score(hist[s : s + 256]) for s in range(0, len(hist), 256)])
        self.valid_ndcg = {
            alpha: metrics_from_ranks(target_ranks(mix(cf, gen, alpha), hist, targets))["ndcg@10"]
            for alpha in ALPHAS
        }
        self.alpha = max(self.valid_ndcg, key=lambda a: self.valid_ndcg[a])
        return self

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return mix(self.cf.score(histories), self.gen.score(histories), self.alpha)


def fit_retrieval(
    model: CatalogScorer,
    retrieval: TextRetrieval,
    split: Split,
    weights: Sequence[float] = RETRIEVAL_WEIGHTS,
    prefixes: Sequence[int] = FIT_PREFIXES,
) -> RetrievalConfig:
    """Retrieval's weight and threshold for ``model``, chosen on validation NDCG@10.

    Each validation user's history is cut to its first ``n`` training items for every ``n`` in
    ``prefixes``; for each weight, retrieval serves the prefixes shorter than a threshold, and
    the pair (weight, threshold) with the largest summed NDCG@10 gain over the model alone wins.
    No gain anywhere leaves retrieval off (weight 0). Full histories, longer than every prefix,
    are untouched whatever is chosen.
    """
    targets = split.targets("valid")
    ndcg: dict[tuple[int, float], float] = {}
    for n in prefixes:
        hist, rows = split.prefix_histories("valid", n)
        if not hist:
            continue
        base, text = model.score(hist), retrieval.score(hist)
        for w in weights:
            scores = base if w == 0.0 else blend(base, text, w)
            ranks = target_ranks(scores, hist, targets[rows])
            ndcg[n, w] = metrics_from_ranks(ranks)["ndcg@10"]
    best, best_gain = RetrievalConfig(), 0.0
    fitted = sorted({n for n, _ in ndcg})
    for w in (w for w in weights if w > 0.0):
        gain = 0.0
        for n in fitted:
            gain += ndcg[n, w] - ndcg[n, 0.0]
            if gain > best_gain + 1e-12:
                best, best_gain = RetrievalConfig(weight=float(w), max_history=n + 1), gain
    record = {f"prefix{n}_w{w}": v for (n, w), v in sorted(ndcg.items())}
    return RetrievalConfig(best.weight, best.max_history, valid_ndcg=record)


class Fusion(Ranker):
    """The served model: per-user standardised scores of several components, weighted.

    ``components`` maps names (:data:`COMPONENTS`: the transformer, EASE, item-kNN, popularity)
    to fitted scorers of one catalog. :meth:`fit` chooses the weights on validation NDCG@10:
    every component alone first, then, from the best of them, coordinate ascent over
    :data:`FUSION_STEPS` for each weight in turn, a move kept only when it gains at least
    ``min_gain``. The single models are candidates, so the fitted fusion's validation NDCG@10 is
    at least the best single model's (on the validation users it was fitted on). ``trace``
    records every weight set tried, in order.
    """

    def __init__(
        self, components: dict[str, CatalogScorer], weights: dict[str, float] | None = None
    ) -> None:
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown component(s) {sorted(unknown)}")
        sizes = {c.n_items for c in components.values() if c.n_items}
        if len(sizes) > 1:
            raise ValueError("all components must score the same catalog")
        self.components = {n: components[n] for n in COMPONENTS if n in components}
        self.n_items = sizes.pop() if sizes else 0
        self.weights = dict(weights) if weights else {next(iter(self.components)): 1.0}
        self.name = self._named()
        self.valid_ndcg: dict[str, float] = {}
        self.trace: list[dict[str, Any]] = []
        self.fit_users = 0

    def _named(self) -> str:
        """The parts of non-zero weight, joined by ``+`` (the served model's name)."""
        return "+".join(n for n in COMPONENTS if self.weights.get(n, 0.0) > 0.0)

    def fit(
        self,
        split: Split,
        *,
        min_gain: float = 1e-4,
        rounds: int = 3,
        max_cells: int = FUSION_CELLS,
    ) -> Fusion:
        """Choose the weights on validation NDCG@10 (see the class docstring)."""
        hist, targets = validation_sample(split, self.n_items, max_cells)
        self.fit_users = len(hist)
        z = {name: standardised_scores(c, hist) for name, c in self.components.items()}
        self.weights, self.valid_ndcg, self.trace = search_weights(
            z, seen_cells(hist), targets, min_gain=min_gain, rounds=rounds
        )
        self.name = self._named()
        return self

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        parts = {
            n: self.components[n].score(histories)
            for n, w in self.weights.items()
            if w > 0.0 and n in self.components
        }
        return fuse(parts, self.weights)

    def refitted(self, part: Split, gen: Callable[[Split], CatalogScorer]) -> Fusion:
        """This fusion fitted again on ``part`` with its weights unchanged: each weighted
        baseline with its own settings (``params()``), the transformer by ``gen``. What
        :func:`lab.trending.heldout_grid` judges as the served model on users it never saw."""
        parts: dict[str, CatalogScorer] = {}
        for name, weight in self.weights.items():
            if weight <= 0.0:
                continue
            if name == "gen":
                parts[name] = gen(part)
                continue
            component = self.components.get(name)
            if not isinstance(component, Ranker):
                raise TypeError(f"{name} cannot be fitted again: not a lab baseline")
            settings = component.params() if hasattr(component, "params") else {}
            parts[name] = type(component)(**settings).fit(part)
        return Fusion(parts, self.weights)

    def summary(self) -> dict[str, Any]:
        """What the fit chose and saw: the weights, validation NDCG@10 and the search trace."""
        return {
            "weights": {n: float(w) for n, w in self.weights.items()},
            "valid_ndcg@10": dict(self.valid_ndcg),
            "fit_users": self.fit_users,
            "trace": list(self.trace),
        }


def standardised_scores(model: CatalogScorer, histories: Sequence[np.ndarray]) -> np.ndarray:
    """``model``'s catalog scores of ``histories``, standardised per user, in batches of 256."""
    return np.concatenate(
        [
            standardise(np.asarray(model.score(histories[s : s + 256]), dtype=np.float32))
            for s in range(0, len(histories), 256)
        ]
    )


def seen_cells(histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, items)`` of every history item, to mask in a ``(users, n_items)`` score array."""
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    if not lengths.sum():
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    items = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
    return np.repeat(np.arange(len(histories)), lengths), items


def search_weights(
    z: dict[str, np.ndarray],
    seen: tuple[np.ndarray, np.ndarray],
    targets: np.ndarray,
    *,
    min_gain: float = 1e-4,
    rounds: int = 3,
) -> tuple[dict[str, float], dict[str, float], list[dict[str, Any]]]:
    """:class:`Fusion`'s weight search on standardised scores ``z`` (name -> users x items).

    Returns the weights (normalised to sum 1), the NDCG@10 of each part alone and ``"fused"``,
    and every weight set tried, in order (see :class:`Fusion`).
    """
    names = list(z)
    trace: list[dict[str, Any]] = []

    def judge(weights: dict[str, float]) -> float:
        fused = np.zeros_like(z[names[0]])
        for n, w in weights.items():
            if w:
                fused += np.float32(w) * z[n]
        ranks = _masked_ranks(fused, seen, targets)
        ndcg = float(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
        trace.append({"weights": dict(weights), "valid_ndcg@10": ndcg})
        return ndcg

    valid_ndcg = {n: judge({n: 1.0}) for n in names}
    first = max(names, key=lambda n: valid_ndcg[n])
    weights = {n: 1.0 if n == first else 0.0 for n in names}
    best = valid_ndcg[first]
    for _ in range(rounds):
        moved = False
        for n in names:
            for step in FUSION_STEPS:
                if step == weights[n]:
                    continue
                trial = {**weights, n: step}
                if not any(trial.values()):
                    continue
                ndcg = judge(trial)
                if ndcg > best + min_gain:
                    weights, best, moved = trial, ndcg, True
        if not moved:
            break
    total = sum(weights.values())
    valid_ndcg["fused"] = best
    return {n: w / total for n, w in weights.items()}, valid_ndcg, trace


def _masked_ranks(
    scores: np.ndarray, seen: tuple[np.ndarray, np.ndarray], targets: np.ndarray
) -> np.ndarray:
    """:func:`lab.protocol.target_ranks` on an in-place copy, with the seen cells given."""
    scores = scores.copy()
    rows = np.arange(len(targets))
    seen_target = np.zeros(len(targets), dtype=bool)
    seen_target[seen[0][seen[1] == targets[seen[0]]]] = True
    scores[seen] = -np.inf
    t = scores[rows, targets][:, None]
    ranks = np.count_nonzero(scores > t, axis=1) + np.count_nonzero(scores == t, axis=1) - 1
    ranks[seen_target] = scores.shape[1]
    out: np.ndarray = ranks
    return out
