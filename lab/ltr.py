"""A learning-to-rank fusion of the served model's parts: LightGBM LambdaRank over candidates.

:class:`lab.hybrid.Fusion` adds the parts' standardised scores with one weight each for every
user. A ranker can weigh them differently per user and per item: it sees, for each candidate,
every part's score, rank and z-score within the user, popularity, the history's length and how
the candidate scores against the last item alone. Per user the candidates are the union of each
part's top ``top_k`` unseen items (:func:`candidate_items`); the label is the held-out item.

The ranker is fitted on the *validation* targets with parts trained on the training data (what
the weighted fusion is fitted on), so test targets never reach it. :func:`cross_validate` judges
it against the weighted fusion and the best single part by a user-level K-fold inside validation
(each fold's ranker stops early on a slice of its own training users), and :func:`choose` keeps
the most complex of the three only where its cross-validated NDCG@10 is higher, so the chosen
model's validation NDCG@10 is at least the best single part's. ``bench/ltr.py`` measures it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.hybrid import standardise
from inference.scoring import CatalogScorer
from lab.hybrid import COMPONENTS, FUSION_CELLS, search_weights, seen_cells, validation_sample
from lab.protocol import Split, ndcg_per_user, target_ranks

if TYPE_CHECKING:
    import lightgbm

__all__ = [
    "CHOICES",
    "TOP_K",
    "CandidateTable",
    "CrossValidation",
    "LtrFit",
    "LtrFusion",
    "LtrParams",
    "candidate_items",
    "candidate_table",
    "choose",
    "cross_validate",
    "feature_names",
    "fit_ltr",
    "predict",
    "score_parts",
    "standardised",
    "table_ndcg",
    "train_ranker",
]

TOP_K = 50  # candidates per part and user (their union is what the ranker orders)
PAIR_TOP = 20  # "among the last item's neighbours": in the pair model's top 20 for it alone
CHOICES = ("single", "fused", "ltr")  # simplest first; a later one must beat the earlier ones
BATCH = 256


@dataclass(frozen=True)
class LtrParams:
    """LightGBM LambdaRank settings: a small booster, early stopping on held-out users."""

    num_leaves: int = 15
    learning_rate: float = 0.05
    min_data_in_leaf: int = 50
    feature_fraction: float = 0.9
    lambda_l2: float = 1.0
    max_rounds: int = 500
    early_stopping: int = 30
    stop_fraction: float = 0.2  # of the training users, held out for early stopping
    base_scale: float = 1.0  # boosting starts from this times the weighted fusion's score
    objective: str = "lambdarank"
    monotone: bool = False  # scores and z-scores may only raise a candidate, ranks lower it
    seed: int = 0

    def base(self, table: CandidateTable) -> np.ndarray:
        """The margin boosting starts from: the weighted fusion's score, scaled (or zeros)."""
        if not self.base_scale or "fused_z" not in table.names:
            return np.zeros(len(table.items), dtype=np.float64)
        column = table.features[:, table.names.index("fused_z")].astype(np.float64)
        out: np.ndarray = self.base_scale * column
        return out

    def lightgbm(self, names: Sequence[str]) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if self.monotone:
            extra["monotone_constraints"] = [
                -1 if n.endswith("_rank") else 1 if n.endswith(("_z", "_score")) else 0
                for n in names
            ]
        return {
            **extra,
            "objective": self.objective,
            "metric": "ndcg",
            "eval_at": [10],
            "lambdarank_truncation_level": 20,
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "lambda_l2": self.lambda_l2,
            "num_threads": 1,
            "deterministic": True,
            "seed": self.seed,
            "verbose": -1,
        }


def score_parts(
    parts: Mapping[str, CatalogScorer], histories: Sequence[np.ndarray], pair: str | None
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Each part's catalog scores of ``histories``; the ``pair`` part's of the last item alone."""
    scores = {n: _batched(p, histories) for n, p in parts.items()}
    if pair is None:
        return scores, None
    last = [np.asarray(h[-1:], dtype=np.int64) for h in histories]
    return scores, _batched(parts[pair], last)


def _batched(part: CatalogScorer, histories: Sequence[np.ndarray]) -> np.ndarray:
    """``part``'s float32 catalog scores of ``histories``, :data:`BATCH` users at a time."""
    return np.concatenate(
        [
            np.asarray(part.score(histories[s : s + BATCH]), dtype=np.float32)
            for s in range(0, len(histories), BATCH)
        ]
    )


def candidate_items(
    scores: Mapping[str, np.ndarray], histories: Sequence[np.ndarray], top_k: int = TOP_K
) -> list[np.ndarray]:
    """Per user, the sorted union of every part's ``top_k`` unseen items (never a seen one)."""
    rows, cols = seen_cells(histories)
    out: list[set[int]] = [set() for _ in histories]
    for s in scores.values():
        masked = np.array(s, dtype=np.float32, copy=True)
        masked[rows, cols] = -np.inf
        k = min(top_k, masked.shape[1])
        top = np.argpartition(-masked, k - 1, axis=1)[:, :k]
        for u, items in enumerate(top):
            out[u].update(int(i) for i in items if np.isfinite(masked[u, i]))
    return [np.array(sorted(c), dtype=np.int64) for c in out]


def feature_names(parts: Sequence[str], pair: str | None) -> tuple[str, ...]:
    names = [f"{n}_{kind}" for n in parts for kind in ("score", "z", "rank")]
    names += ["log_history", "agree_top10"]
    if pair is not None:
        names += [f"last_{pair}_z", f"last_{pair}_top{PAIR_TOP}"]
    return tuple(names)


@dataclass(frozen=True)
class CandidateTable:
    """One row per (user, candidate), grouped by user in order; ``labels`` 1 on the target."""

    users: np.ndarray  # the row's user: its index in the histories scored
    items: np.ndarray
    features: np.ndarray  # float32, (rows, len(names))
    labels: np.ndarray
    names: tuple[str, ...]

    def select(self, users: np.ndarray) -> CandidateTable:
        """The rows of ``users`` (sorted), in the same order."""
        keep = np.isin(self.users, users)
        return CandidateTable(
            self.users[keep], self.items[keep], self.features[keep], self.labels[keep], self.names
        )

    def groups(self) -> np.ndarray:
        """Candidates per user, in row order (users are contiguous)."""
        _, sizes = np.unique(self.users, return_counts=True)
        out: np.ndarray = sizes
        return out

    def with_fusion(self, weights: Mapping[str, float]) -> CandidateTable:
        """The table with ``fused_z``: the weighted fusion's score, from the parts' z columns
        (replaced when present, so each cross-validation fold sets its own weights)."""
        keep = [i for i, n in enumerate(self.names) if n != "fused_z"]
        column = np.zeros(len(self.items), dtype=np.float32)
        for name, w in weights.items():
            if w:
                column += np.float32(w) * self.features[:, self.names.index(f"{name}_z")]
        features = np.column_stack([self.features[:, keep], column]).astype(np.float32)
        names = (*(self.names[i] for i in keep), "fused_z")
        return CandidateTable(self.users, self.items, features, self.labels, names)

    def order(self, predictions: np.ndarray) -> np.ndarray:
        """Each row's 0-based position within its user: by ``predictions``, ties broken by the
        weighted fusion (``fused_z``) when the table has it, then by row."""
        tie = (
            self.features[:, self.names.index("fused_z")]
            if "fused_z" in self.names
            else np.zeros(len(self.items), dtype=np.float32)
        )
        rows = np.lexsort((-tie, -np.asarray(predictions, dtype=np.float64), self.users))
        starts = np.searchsorted(self.users[rows], self.users[rows], side="left")
        position = np.empty(len(rows), dtype=np.int64)
        position[rows] = np.arange(len(rows)) - starts
        return position

    def with_positive(self) -> CandidateTable:
        """Only the users whose target is among their candidates (the others teach nothing)."""
        return self.select(np.unique(self.users[self.labels > 0]))


def _unseen_ranks(masked: np.ndarray) -> np.ndarray:
    """0-based rank of every item in its row (seen items, at -inf, rank last)."""
    order = np.argsort(-masked, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(masked.shape[1])[None, :], axis=1)
    return ranks


def candidate_table(
    scores: Mapping[str, np.ndarray],
    pair_scores: np.ndarray | None,
    histories: Sequence[np.ndarray],
    targets: np.ndarray | None = None,
    *,
    top_k: int = TOP_K,
    pair: str | None = None,
) -> CandidateTable:
    """Candidates and their features for ``histories``; labels from ``targets`` when given.

    Features read only the scores and the histories: the targets set the labels and nothing else.
    """
    parts = [n for n in COMPONENTS if n in scores]
    cands = candidate_items(scores, histories, top_k)
    sizes = np.array([len(c) for c in cands], dtype=np.int64)
    users = np.repeat(np.arange(len(histories)), sizes)
    items = np.concatenate(cands) if len(cands) else np.empty(0, dtype=np.int64)
    rows, cols = seen_cells(histories)
    columns: list[np.ndarray] = []
    top10 = np.zeros(len(items), dtype=np.float32)
    for n in parts:
        raw = np.asarray(scores[n], dtype=np.float32)
        masked = raw.copy()
        masked[rows, cols] = -np.inf
        rank = _unseen_ranks(masked)[users, items].astype(np.float32)
        columns += [raw[users, items], standardise(raw)[users, items], rank]
        top10 += rank < 10
    lengths = np.fromiter((len(h) for h in histories), dtype=np.float32, count=len(histories))
    columns += [np.log1p(lengths)[users], top10]
    if pair is not None:
        if pair_scores is None:
            raise ValueError(f"pair feature {pair!r} needs the last item's scores")
        masked = np.asarray(pair_scores, dtype=np.float32).copy()
        masked[rows, cols] = -np.inf
        z = standardise(np.asarray(pair_scores, dtype=np.float32))
        columns += [z[users, items], (_unseen_ranks(masked)[users, items] < PAIR_TOP)]
    features = np.stack([np.asarray(c, dtype=np.float32) for c in columns], axis=1)
    labels = np.zeros(len(items), dtype=np.float32)
    if targets is not None:
        labels[items == np.asarray(targets, dtype=np.int64)[users]] = 1.0
    return CandidateTable(users, items, features, labels, feature_names(parts, pair))


def train_ranker(
    table: CandidateTable,
    params: LtrParams,
    *,
    rounds: int | None = None,
) -> tuple[lightgbm.Booster, int]:
    """A LambdaRank booster on ``table``'s users with a positive, and its number of rounds.

    Without ``rounds``, a ``stop_fraction`` of the users (chosen by ``params.seed``) is held out
    and training stops when their NDCG@10 has not risen for ``early_stopping`` rounds.
    """
    import lightgbm

    if "fused_z" not in table.names:
        raise ValueError("train on a table with the weighted fusion's column (with_fusion)")
    table = table.with_positive()
    users = np.unique(table.users)
    if len(users) < 2:
        raise ValueError("the ranker needs at least two users whose target is a candidate")
    config = params.lightgbm(table.names)
    if rounds is not None:
        data = lightgbm.Dataset(
            table.features, table.labels, group=table.groups(), init_score=params.base(table)
        )
        return lightgbm.train(config, data, num_boost_round=max(rounds, 1)), rounds
    rng = np.random.default_rng(params.seed)
    stop = np.sort(rng.choice(users, size=max(1, int(len(users) * params.stop_fraction))))
    fit, held = table.select(np.setdiff1d(users, stop)), table.select(stop)
    data = lightgbm.Dataset(
        fit.features, fit.labels, group=fit.groups(), init_score=params.base(fit)
    )
    valid = lightgbm.Dataset(
        held.features,
        held.labels,
        group=held.groups(),
        init_score=params.base(held),
        reference=data,
    )
    booster = lightgbm.train(
        config,
        data,
        num_boost_round=params.max_rounds,
        valid_sets=[valid],
        callbacks=[lightgbm.early_stopping(params.early_stopping, verbose=False)],
    )
    best = int(booster.best_iteration or params.max_rounds)
    return booster, best


def predict(
    booster: lightgbm.Booster, table: CandidateTable, params: LtrParams, rounds: int | None = None
) -> np.ndarray:
    """The ranker's scores of ``table``: the base margin plus the first ``rounds`` trees."""
    trees = np.asarray(booster.predict(table.features, num_iteration=rounds), dtype=np.float64)
    out: np.ndarray = params.base(table) + trees
    return out


def table_ndcg(table: CandidateTable, predictions: np.ndarray, n_users: int) -> np.ndarray:
    """Per-user NDCG@10 of ordering each user's candidates as :meth:`CandidateTable.order`
    does (a user whose target is not a candidate scores 0)."""
    ranks = np.full(n_users, 10**9, dtype=np.int64)
    hit = table.labels > 0
    ranks[table.users[hit]] = table.order(predictions)[hit]
    return ndcg_per_user(ranks)


@dataclass
class CrossValidation:
    """Out-of-fold NDCG@10 per validation user of the best single part, the weighted fusion and
    the ranker (each fitted on the other folds), and what each fold chose."""

    ndcg: dict[str, np.ndarray]
    folds: list[dict[str, Any]] = field(default_factory=list)

    def means(self) -> dict[str, float]:
        return {n: float(v.mean()) for n, v in self.ndcg.items()}


def standardised(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each part's catalog scores standardised per user, as :func:`cross_validate` takes them."""
    return {name: standardise(np.asarray(s, dtype=np.float32)) for name, s in scores.items()}


def cross_validate(
    z: Mapping[str, np.ndarray],
    table: CandidateTable,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    *,
    folds: int = 5,
    params: LtrParams | None = None,
) -> CrossValidation:
    """User-level K-fold over the validation users (see the module docstring).

    ``z`` is each part's scores from :func:`standardised`, computed once for every repeat.
    """
    params = params or LtrParams()
    n = len(histories)
    order = np.random.default_rng(params.seed).permutation(n)
    fold_of = np.empty(n, dtype=np.int64)
    fold_of[order] = np.arange(n) % folds
    out = {name: np.zeros(n) for name in CHOICES}
    report: list[dict[str, Any]] = []
    for k in range(folds):
        test = np.flatnonzero(fold_of == k)
        train = np.flatnonzero(fold_of != k)
        train_hist = [histories[int(u)] for u in train]
        test_hist = [histories[int(u)] for u in test]
        weights, singles, _ = search_weights(
            {name: v[train] for name, v in z.items()}, seen_cells(train_hist), targets[train]
        )
        single = max((name for name in singles if name != "fused"), key=lambda m: singles[m])
        out["single"][test] = ndcg_per_user(target_ranks(z[single][test], test_hist, targets[test]))
        fused = sum(np.float32(w) * z[name][test] for name, w in weights.items() if w)
        out["fused"][test] = ndcg_per_user(
            target_ranks(np.asarray(fused), test_hist, targets[test])
        )
        folded = table.with_fusion(weights)
        booster, rounds = train_ranker(folded.select(train), params)
        held = folded.select(test)
        predictions = predict(booster, held, params, rounds)
        out["ltr"][test] = table_ndcg(held, predictions, n)[test]
        report.append({"single": single, "weights": weights, "rounds": rounds})
    return CrossValidation(out, report)


def choose(valid_ndcg: Mapping[str, float], min_gain: float = 1e-4) -> str:
    """The model to serve among :data:`CHOICES`: a more complex one only where its validation
    NDCG@10 beats the best simpler one by ``min_gain`` (so never below the best single)."""
    best = CHOICES[0]
    for name in CHOICES[1:]:
        if name in valid_ndcg and valid_ndcg[name] > valid_ndcg[best] + min_gain:
            best = name
    return best


class LtrFusion:
    """The fitted ranker as a catalog scorer: its candidates ordered by the booster, above every
    other item (which all share the lowest score)."""

    def __init__(
        self,
        parts: Mapping[str, CatalogScorer],
        booster: lightgbm.Booster,
        weights: Mapping[str, float],
        params: LtrParams,
        *,
        top_k: int = TOP_K,
        pair: str | None = None,
    ) -> None:
        sizes = {p.n_items for p in parts.values() if p.n_items}
        if len(sizes) != 1:
            raise ValueError("all parts must score one catalog")
        self.parts = {n: parts[n] for n in COMPONENTS if n in parts}
        self.booster, self.params, self.top_k, self.pair = booster, params, top_k, pair
        self.weights = {n: float(w) for n, w in weights.items() if n in self.parts}
        self.n_items = sizes.pop()
        self.name = "ltr(" + "+".join(self.parts) + ")"

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        scores, pair_scores = score_parts(self.parts, histories, self.pair)
        table = candidate_table(
            scores, pair_scores, histories, top_k=self.top_k, pair=self.pair
        ).with_fusion(self.weights)
        position = table.order(predict(self.booster, table, self.params))
        # Candidates above every other item, in the ranker's order; the rest share the floor.
        floor = float(position.max()) + 1.0 if len(position) else 0.0
        out = np.full((len(histories), self.n_items), -floor, dtype=np.float32)
        out[table.users, table.items] = -position.astype(np.float32)
        return out


@dataclass
class LtrFit:
    """A ranker fitted on validation, its cross-validated comparison and what :func:`choose`
    makes of it."""

    model: LtrFusion
    cv_ndcg: dict[str, np.ndarray]  # per validation user, out-of-fold, mean over the repeats
    summary: dict[str, Any]

    @property
    def chosen(self) -> str:
        return str(self.summary["chosen"])


def fit_ltr(
    parts: Mapping[str, CatalogScorer],
    split: Split,
    weights: Mapping[str, float],
    *,
    params: LtrParams | None = None,
    repeats: int = 3,
    top_k: int = TOP_K,
) -> LtrFit:
    """The ranker over ``parts`` on the validation users :class:`lab.hybrid.Fusion` fits on,
    with the fitted fusion's ``weights`` as its starting margin and tie-breaker.

    :func:`cross_validate` runs ``repeats`` times with other folds (one K-fold split of a few
    hundred users is noisy at the third decimal); the final ranker, on every validation user,
    gets the median of the folds' early-stopped rounds.
    """
    params = params or LtrParams()
    pair = "ease" if "ease" in parts else None
    n_items = next(p.n_items for p in parts.values() if p.n_items)
    hist, targets = validation_sample(split, n_items, FUSION_CELLS)
    scores, pair_scores = score_parts(parts, hist, pair)
    table = candidate_table(scores, pair_scores, hist, targets, top_k=top_k, pair=pair)
    z = standardised(scores)
    runs = [
        cross_validate(z, table, hist, targets, params=replace(params, seed=params.seed + r))
        for r in range(repeats)
    ]
    cv_ndcg = {n: np.mean([cv.ndcg[n] for cv in runs], axis=0) for n in CHOICES}
    cv_means = {n: float(v.mean()) for n, v in cv_ndcg.items()}
    rounds = int(np.median([f["rounds"] for cv in runs for f in cv.folds]))
    table = table.with_fusion(weights)
    booster, rounds = train_ranker(table, params, rounds=rounds)
    gain = booster.feature_importance(importance_type="gain").tolist()
    summary = {
        "cv_valid_ndcg@10": cv_means,
        "chosen": choose(cv_means),
        "valid_users": len(hist),
        "candidates_per_user": float(len(table.items) / max(len(hist), 1)),
        "candidate_recall": float(len(np.unique(table.users[table.labels > 0])) / len(hist)),
        "rounds": rounds,
        "feature_gain": dict(sorted(zip(table.names, gain, strict=True), key=lambda kv: -kv[1])),
        "cv_repeats": [{"means": cv.means(), "folds": cv.folds} for cv in runs],
    }
    model = LtrFusion(parts, booster, weights, params, top_k=top_k, pair=pair)
    return LtrFit(model, cv_ndcg, summary)
