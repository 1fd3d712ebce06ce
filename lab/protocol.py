"""The evaluation protocol: time-ordered leave-one-out, full-catalog ranking, and the metrics.

Every model is judged the same way (DESIGN.md, "Evaluation protocol"): each user's interactions in
time order (ties keep file order); the last one is the test target, the one before it the
validation target, everything earlier is training data. A model scores the whole catalog, the
items the user has already seen are masked, and the rank of the held-out item gives the metrics.

With one held-out item per user, precision and recall reduce to the hit indicator: P@5 is
``hit@5 / 5`` and R@10 equals HR@10. Both are still reported under their own names because the
literature quotes them that way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from inference.scoring import CatalogScorer
from lab.datasets import Dataset, Item

__all__ = [
    "METRIC_KEYS",
    "Split",
    "coverage_at",
    "diversity_at",
    "genre_jaccard",
    "latency_summary",
    "leave_one_out",
    "metrics_from_ranks",
    "ndcg_per_user",
    "significance",
    "stage_ndcg_per_user",
    "target_ranks",
]

METRIC_KEYS = ("hr@10", "ndcg@10", "p@5", "r@10", "coverage@10", "diversity")


@dataclass
class Split:
    """Index mappings and the leave-one-out split of one dataset.

    Item indices run ``0 .. n_items-1`` in order of first appearance in the time-ordered data.
    ``train[u]`` holds user ``u``'s training items (all but the last two); users with fewer than
    three interactions keep everything for training and are not evaluated.
    """

    dataset: str
    sha256: dict[str, str]
    item_ids: list[str]
    user_ids: list[str]
    train: list[np.ndarray]
    valid_target: np.ndarray  # -1 where the user is not evaluated
    test_target: np.ndarray
    items: dict[str, Item] = field(default_factory=dict)
    item_index: dict[str, int] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def eval_users(self) -> np.ndarray:
        """Indices of the users that have a validation and a test target."""
        return np.flatnonzero(self.test_target >= 0)

    def histories(self, stage: str) -> list[np.ndarray]:
        """Model input per evaluated user: training items (+ the validation item at test)."""
        if stage not in ("valid", "test"):
            raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")
        out = []
        for u in self.eval_users:
            hist = self.train[u]
            if stage == "test":
                hist = np.append(hist, self.valid_target[u])
            out.append(hist)
        return out

    def prefix_histories(self, stage: str, n: int) -> tuple[list[np.ndarray], np.ndarray]:
        """The cold-start view of ``stage``: each user's first ``n`` training items, oldest first.

        Returns ``(histories, rows)``: only users with at least ``n`` training items take part,
        and ``rows`` are their positions among the evaluated users, so ``targets(stage)[rows]``
        are their held-out items (the same targets as the full protocol). A prefix is cut from
        the training items only: at test it never holds the validation item, and at neither
        stage the target, which comes after every training item.
        """
        if stage not in ("valid", "test"):
            raise ValueError(f"stage must be 'valid' or 'test', not {stage!r}")
        if n < 1:
            raise ValueError(f"a prefix holds at least one item, not {n}")
        rows = [r for r, u in enumerate(self.eval_users) if len(self.train[u]) >= n]
        return [self.train[self.eval_users[r]][:n] for r in rows], np.asarray(rows, dtype=np.int64)

    def targets(self, stage: str) -> np.ndarray:
        target = self.valid_target if stage == "valid" else self.test_target
        out: np.ndarray = target[self.eval_users]
        return out

    def full_sequences(self) -> list[np.ndarray]:
        """Every user's whole history (train + valid + test), for serving-time artifacts."""
        out = []
        for u, hist in enumerate(self.train):
            extra = [t for t in (self.valid_target[u], self.test_target[u]) if t >= 0]
            out.append(np.append(hist, np.asarray(extra, dtype=np.int64)))
        return out

    def subset(self, n_users: int) -> Split:
        """The same split with only the first ``n_users`` evaluated users still evaluated.

        Training data is untouched; per-user results on the subset line up with the first
        ``n_users`` entries of results on the whole split.
        """
        keep = self.eval_users[:n_users]
        valid = np.full_like(self.valid_target, -1)
        test = np.full_like(self.test_target, -1)
        valid[keep], test[keep] = self.valid_target[keep], self.test_target[keep]
        return replace(self, valid_target=valid, test_target=test)

    def genres(self) -> list[frozenset[str]]:
        """Each item's categories, by item index (empty where the catalog has none)."""
        return [
            frozenset(self.items[i].categories) if i in self.items else frozenset()
            for i in self.item_ids
        ]


def leave_one_out(ds: Dataset) -> Split:
    """Split a dataset time-ordered: last interaction = test, second-to-last = validation."""
    item_index: dict[str, int] = {}
    user_index: dict[str, int] = {}
    seqs: list[list[int]] = []
    for it in ds.interactions:  # already sorted by time, ties in file order
        i = item_index.setdefault(it.item_id, len(item_index))
        u = user_index.setdefault(it.user_id, len(user_index))
        if u == len(seqs):
            seqs.append([])
        seqs[u].append(i)
    train, valid, test = [], [], []
    for seq in seqs:
        if len(seq) >= 3:
            train.append(np.asarray(seq[:-2], dtype=np.int64))
            valid.append(seq[-2])
            test.append(seq[-1])
        else:
            train.append(np.asarray(seq, dtype=np.int64))
            valid.append(-1)
            test.append(-1)
    return Split(
        dataset=ds.name,
        sha256=dict(ds.sha256),
        item_ids=list(item_index),
        user_ids=list(user_index),
        train=train,
        valid_target=np.asarray(valid, dtype=np.int64),
        test_target=np.asarray(test, dtype=np.int64),
        items=ds.items,
        item_index=item_index,
    )


def target_ranks(
    scores: np.ndarray, histories: Sequence[np.ndarray], targets: np.ndarray
) -> np.ndarray:
    """0-based rank of each target among the unseen items (seen items masked, ties pessimistic).

    ``scores`` is ``(users, n_items)``. A target the user has already seen cannot be ranked and
    counts as a miss (rank = n_items).
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    targets = np.asarray(targets, dtype=np.int64)
    n_rows = len(targets)
    if n_rows == 0:
        return np.empty(0, dtype=np.int64)
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=n_rows)
    rows = np.repeat(np.arange(n_rows), lengths)
    cols = (
        np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
        if lengths.sum()
        else np.empty(0, dtype=np.int64)
    )
    seen_target = np.bincount(rows[cols == targets[rows]], minlength=n_rows) > 0
    scores[rows, cols] = -np.inf
    t = scores[np.arange(n_rows), targets][:, None]
    # Ties count against the target so a constant scorer cannot look good.
    ranks = np.count_nonzero(scores > t, axis=1) + np.count_nonzero(scores == t, axis=1) - 1
    ranks[seen_target] = scores.shape[1]
    out: np.ndarray = ranks.astype(np.int64)
    return out


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k with one relevant item: ``1 / log2(rank + 2)`` inside the top k."""
    ranks = np.asarray(ranks)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def stage_ndcg_per_user(
    model: CatalogScorer,
    split: Split,
    stage: str,
    *,
    max_users: int | None = None,
    batch: int = 512,
) -> np.ndarray:
    """Each evaluated user's NDCG@10 on ``stage``'s target, ``model`` scoring ``batch`` at a time.

    ``max_users`` judges an evenly spaced sample of that many users (all of them when there are
    fewer).
    """
    hist, targets = split.histories(stage), split.targets(stage)
    if max_users is not None and len(hist) > max_users:
        rows = np.unique(np.linspace(0, len(hist) - 1, max_users).astype(np.int64))
        hist, targets = [hist[r] for r in rows], targets[rows]
    if not hist:
        raise ValueError(f"no {stage} users to judge")
    parts = [
        target_ranks(model.score(hist[s : s + batch]), hist[s : s + batch], targets[s : s + batch])
        for s in range(0, len(hist), batch)
    ]
    return ndcg_per_user(np.concatenate(parts))


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """HR@10, NDCG@10, P@5 (= hit@5 / 5) and R@10 (= HR@10) from 0-based target ranks."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no ranks to summarise")
    hit10 = float(np.mean(ranks < 10))
    return {
        "hr@10": hit10,
        "ndcg@10": float(np.mean(ndcg_per_user(ranks, 10))),
        "p@5": float(np.mean(ranks < 5)) / 5.0,
        "r@10": hit10,
    }


def coverage_at(top: np.ndarray, n_items: int) -> float:
    """Share of the catalog that appears in at least one user's top-k list."""
    if n_items <= 0:
        raise ValueError("n_items must be positive")
    return float(np.unique(np.asarray(top).ravel()).size) / n_items


def genre_jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    """Jaccard similarity of two genre sets; two items without genres count as dissimilar (0)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


def diversity_at(top: np.ndarray, genres: Sequence[frozenset[str]]) -> float:
    """Mean over users of 1 - (mean pairwise genre-Jaccard within that user's list)."""
    values = []
    for row in np.asarray(top):
        sets = [genres[int(i)] for i in row]
        n = len(sets)
        if n < 2:
            continue
        total = sum(genre_jaccard(sets[a], sets[b]) for a in range(n) for b in range(a + 1, n))
        values.append(1.0 - total / (n * (n - 1) / 2))
    return float(np.mean(values)) if values else math.nan


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50 and p99 of per-user latencies, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    return {
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p99": float(np.percentile(ms, 99)),
    }


def significance(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Paired tests on per-user NDCG@10: Wilcoxon signed-rank and paired t."""
    from scipy import stats

    diff = np.asarray(ours) - np.asarray(theirs)
    out = {"mean_diff": float(diff.mean()), "users": float(diff.size)}
    if np.count_nonzero(diff) == 0:
        return {**out, "wilcoxon_p": 1.0, "paired_t_p": 1.0}
    out["wilcoxon_p"] = float(stats.wilcoxon(ours, theirs).pvalue)
    out["paired_t_p"] = float(stats.ttest_rel(ours, theirs).pvalue)
    return out
