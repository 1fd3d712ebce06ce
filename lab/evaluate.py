"""Evaluation runs: every model under the same protocol, one report, a table and a plot.

Baselines are tuned on validation NDCG@10 and scored on the test targets; the generative model is
trained per seed (or loaded from artifacts trained on the same data) and compared with the best
baseline by a paired per-user test on NDCG@10. Every result carries the SHA-256 of the input files
and the count of recommended items outside the catalog (checked, and required to be zero).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from inference.exceptions import InferenceError
from inference.postprocess import CatalogPost, PostConfig
from inference.retrieval import RetrievalBlend, RetrievalConfig, TextRetrieval
from inference.scoring import CatalogScorer, top_k_unseen
from inference.trending import blend_recent, recent_feature
from lab.baselines import EASE, ItemKNN, PopularityRanker, Ranker, tune
from lab.protocol import (
    METRIC_KEYS,
    Split,
    coverage_at,
    diversity_at,
    latency_summary,
    metrics_from_ranks,
    ndcg_per_user,
    significance,
    target_ranks,
)
from lab.trending import Cell, RecentPopularity, TrendingChoice, at_targets, prefix_changes

__all__ = [
    "BASELINES",
    "MODELS",
    "PostRanked",
    "SharedScores",
    "baseline",
    "choose_trending",
    "cold_start",
    "cold_start_table",
    "describe_blend",
    "evaluate",
    "evaluate_together",
    "gen_preset",
    "plot_report",
    "significance",
    "table",
    "trending_cold_start",
    "trending_grid",
]

BASELINES = ("pop", "itemknn", "ease")
MODELS = (*BASELINES, "gen", "gen+ease", "fused", "served", "gen+ease+post", "gen+rerank")
# Compared with the best baseline by the paired test.
COMPARED = ("gen", "gen+ease", "fused", "served", "gen+ease+post", "gen+rerank")
LATENCY_USERS = 200
RETRIEVED = "gen+ease+retrieval"  # the cold-start protocol's name for gen+ease with retrieval
TRENDING = "gen+ease+trending"  # and for gen+ease with recent popularity (lab.trending)

GRIDS: dict[str, dict[str, Sequence[float]]] = {
    "itemknn": {"k_neighbours": [20, 50, 200], "decay": [1.0, 0.9, 0.8, 0.7, 0.6]},
    "ease": {"lam": [300, 1000, 3000], "decay": [1.0, 0.9, 0.8], "beta": [0.0, 0.3, 1.0]},
}


def gen_preset(dataset: str) -> dict[str, Any]:
    """Transformer hyper-parameters chosen on validation NDCG@10 for each known dataset."""
    common = {
        "max_len": 200,
        "batch_size": 32,
        "ffn": 128,
        "lr": 3e-3,
        "attn_dropout": 0.0,
        "dropout": 0.3,
        "text_init": True,
        "ema": 0.99,
        "patience": 15,
    }
    # On ml-latest-small and its llamarec subset, text vectors projected on their principal
    # directions beat the random projection on validation (llamarec: three seeds, docs/models.md,
    # "Where llamarec's gap comes from"). llamarec's preset once added a target on the two items
    # after the next (``future`` 3), chosen before the EMA and the text start; with them the plain
    # next-item target scores higher on validation, so that target is gone.
    # llamarec's transformer also learns from EASE (``distill`` 0.2, lab.training.Distillation):
    # alone it then beats EASE, and the served fusion stays where it was on validation. On
    # ML-100K the fusion loses more than the transformer gains, at 0.2 as at 0.5, so it does
    # not distil (docs/models.md, "Distillation from EASE").
    presets: dict[str, dict[str, Any]] = {
        "ml-latest-small": {"text_projection": "pca"},
        "ml-latest-small-llamarec": {"text_projection": "pca", "distill": 0.2},
    }
    return {**common, **presets.get(dataset, {})}


def baseline(
    name: str,
    split: Split,
    say: Callable[[str], None] = print,
    *,
    ease_max_items: int | None = None,
    params: dict[str, float] | None = None,
    progress: bool = True,
) -> Ranker:
    """Fit a baseline, tuning its hyper-parameters on validation NDCG@10 (with a progress bar).

    ``params`` (settings already chosen on this split's validation, e.g. by the training that
    wrote an artifact) are fitted once instead of searching the grid again. EASE is solved for
    ``ease_max_items`` items (default: :func:`lab.plan.ease_bound` of the catalog).
    """
    from lab.plan import ease_bound

    if name == "pop":
        return PopularityRanker().fit(split)
    if name not in GRIDS:
        raise InferenceError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    if ease_max_items is None:
        ease_max_items = int((params or {}).get("max_items", 0)) or ease_bound(split.n_items)
    model: Ranker = ItemKNN() if name == "itemknn" else EASE(max_items=ease_max_items)
    started = time.perf_counter()
    if params is not None:
        for key in (k for k in _SETTINGS[name] if k in params):
            value = params[key]
            setattr(model, key, int(value) if key in _INTEGERS else float(value))
        model.fit(split)
        chosen = {k: getattr(model, k) for k in _SETTINGS[name]}
        say(
            f"{name}: the settings chosen on validation in training {chosen}, fitted in "
            f"{time.perf_counter() - started:.0f}s"
        )
        return model
    best = tune(model, split, GRIDS[name], progress=progress)
    say(f"{name}: tuned on validation {best} in {time.perf_counter() - started:.0f}s")
    return model


# The settings of each baseline that ``baseline(params=...)`` takes, and which are integers.
_SETTINGS = {
    "ease": ("lam", "decay", "beta", "markov_last"),
    "itemknn": ("k_neighbours", "decay"),
}
_INTEGERS = frozenset({"markov_last", "k_neighbours"})


def evaluate(
    model: CatalogScorer,
    split: Split,
    stage: str = "test",
    batch_size: int = 256,
    latency_users: int = LATENCY_USERS,
) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics of ``model`` on ``stage`` and the per-user NDCG@10 (for paired tests)."""
    return evaluate_together({"model": model}, split, stage, batch_size, latency_users)["model"]


def evaluate_together(
    models: dict[str, CatalogScorer],
    split: Split,
    stage: str = "test",
    batch_size: int = 256,
    latency_users: int = LATENCY_USERS,
) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
    """:func:`evaluate` of several models, batch by batch in step.

    Each model's figures are those :func:`evaluate` gives it alone; scoring every model on a
    batch before the next lets models built on one :class:`SharedScores` (the transformer alone,
    in the hybrid and in the fusion) compute its scores once per batch.
    """
    hist, targets = split.histories(stage), split.targets(stage)
    ranks: dict[str, list[np.ndarray]] = {name: [] for name in models}
    tops: dict[str, list[np.ndarray]] = {name: [] for name in models}
    for s in range(0, len(hist), batch_size):
        chunk, wanted = hist[s : s + batch_size], targets[s : s + batch_size]
        for name, model in models.items():
            r, top = _rank_targets(model, chunk, wanted, split.n_items, batch_size)
            ranks[name].append(r)
            tops[name].append(top)
    out = {}
    for name, model in models.items():
        all_ranks = np.concatenate(ranks[name]) if hist else np.empty(0, dtype=np.int64)
        all_top = np.concatenate(tops[name]) if hist else np.empty((0, 10), dtype=np.int64)
        result: dict[str, Any] = metrics_from_ranks(all_ranks)
        result["coverage@10"] = coverage_at(all_top, split.n_items)
        result["diversity"] = diversity_at(all_top, split.genres())
        # Single-user requests, as the streaming path issues them (one profile change at a time).
        timings = []
        for h in hist[:latency_users]:
            t0 = time.perf_counter()
            top_k_unseen(model.score([h]), [h], 10)
            timings.append(time.perf_counter() - t0)
        if timings:
            result.update(latency_summary(timings))
        # _rank_targets fails on any out-of-catalog or seen item, so both counts are 0.
        result["out_of_catalog"] = 0
        result["seen_returned"] = 0
        result["users"] = len(hist)
        result["dataset_sha256"] = dict(split.sha256)
        out[name] = (result, ndcg_per_user(all_ranks))
    return out


class SharedScores:
    """A scorer that keeps its last batch's scores, so models built on it score a batch once.

    The transformer is the costly part of ``gen``, ``gen+ease`` and ``fused``;
    :func:`evaluate_together` asks all three for one batch in turn, and this wrapper answers
    the second and third from the first (a copy, so no caller can change what the next sees).
    """

    def __init__(self, base: CatalogScorer) -> None:
        self.base = base
        self.name = base.name
        self.n_items = base.n_items
        self._key: tuple[Any, ...] | None = None
        self._scores = np.empty((0, 0), dtype=np.float32)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)  # the scorer's own attributes (cfg, precision)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        key = _batch_key(histories)
        if key != self._key:
            self._scores = np.asarray(self.base.score(histories), dtype=np.float32)
            self._key = key
        return self._scores.copy()


def _batch_key(histories: Sequence[np.ndarray]) -> tuple[Any, ...]:
    """What identifies a batch of histories: their lengths and a digest of their items."""
    import hashlib

    lengths = tuple(len(h) for h in histories)
    items = np.concatenate(
        [np.asarray(h, dtype=np.int64) for h in histories] or [np.empty(0, np.int64)]
    )
    return lengths, hashlib.blake2b(items.tobytes()).hexdigest()


def _rank_targets(
    model: CatalogScorer,
    hist: Sequence[np.ndarray],
    targets: np.ndarray,
    n_items: int,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Target ranks and top 10s of ``model`` on ``hist``; fails on a non-catalog or seen item."""
    ranks, tops = [], []
    for s in range(0, len(hist), batch_size):
        chunk = hist[s : s + batch_size]
        rank, top = _checked_ranks(
            model.name, model.score(chunk), chunk, targets[s : s + batch_size], n_items
        )
        ranks.append(rank)
        tops.append(top)
    return np.concatenate(ranks), np.concatenate(tops)


def _checked_ranks(
    name: str,
    scores: np.ndarray,
    hist: Sequence[np.ndarray],
    targets: np.ndarray,
    n_items: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Target ranks and top 10s of ``scores``; fails on a non-catalog or seen item."""
    if scores.shape[1] != n_items:
        raise InferenceError(f"{name} scored {scores.shape[1]} items, not the catalog")
    top, _ = top_k_unseen(scores.copy(), hist, 10)
    out_of_catalog = int(np.count_nonzero((top < 0) | (top >= n_items)))
    seen_returned = sum(int(np.isin(t, h).sum()) for t, h in zip(top, hist, strict=True))
    if out_of_catalog or seen_returned:
        raise InferenceError(
            f"{name} returned {out_of_catalog} out-of-catalog and {seen_returned} seen items"
        )
    return target_ranks(scores, hist, targets), top


def _cold_start_views(
    split: Split, prefixes: Sequence[int], stage: str
) -> list[tuple[str, list[np.ndarray], np.ndarray]]:
    """``(label, histories, rows)`` of each prefix and of ``"full"``: the histories and their
    positions among the evaluated users (:meth:`lab.protocol.Split.prefix_histories`)."""
    views = [(str(n), *split.prefix_histories(stage, n)) for n in prefixes]
    views.append(("full", split.histories(stage), np.arange(len(split.eval_users))))
    return views


def cold_start(
    models: dict[str, CatalogScorer], split: Split, prefixes: Sequence[int], stage: str = "test"
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """The cold-start protocol: every model on each user's first ``n`` training items.

    For each ``n`` in ``prefixes`` (and ``"full"``, the normal protocol's histories) the users
    with at least ``n`` training items are ranked on the same held-out target as the normal
    protocol (:meth:`lab.protocol.Split.prefix_histories`). Returns, per prefix, each model's
    HR@10, NDCG@10 and user count, and its per-user NDCG@10 (for paired tests).
    """
    rows: dict[str, dict[str, Any]] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    targets = split.targets(stage)
    for label, hist, at in _cold_start_views(split, prefixes, stage):
        rows[label], per_user[label] = {}, {}
        if not hist:
            continue
        for name, model in models.items():
            ranks = _rank_targets(model, hist, targets[at], split.n_items)[0]
            metrics = metrics_from_ranks(ranks)
            rows[label][name] = {
                "hr@10": metrics["hr@10"],
                "ndcg@10": metrics["ndcg@10"],
                "users": len(hist),
            }
            per_user[label][name] = ndcg_per_user(ranks)
    return rows, per_user


def trending_cold_start(
    model: CatalogScorer,
    split: Split,
    prefixes: Sequence[int],
    recent: RecentPopularity,
    choice: TrendingChoice,
    *,
    below: int,
    stage: str = "test",
    batch_size: int = 256,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """:func:`cold_start` for ``model`` blended with recent popularity up to each target's
    moment (:func:`inference.trending.blend_recent`, :mod:`lab.trending`) on histories shorter than
    ``below`` items; longer ones keep the model's scores. Returns, per prefix and ``"full"``,
    HR@10, NDCG@10 and user count, and the per-user NDCG@10."""
    targets = split.targets(stage)
    rows_out: dict[str, dict[str, Any]] = {}
    per_user: dict[str, np.ndarray] = {}
    for label, hist, rows in _cold_start_views(split, prefixes, stage):
        if not hist:
            rows_out[label] = {}
            continue
        ranks = []
        for s in range(0, len(hist), batch_size):
            chunk, at = hist[s : s + batch_size], rows[s : s + batch_size]
            scores = model.score(chunk)
            short = np.fromiter((len(h) < below for h in chunk), dtype=bool, count=len(chunk))
            if choice.weight > 0 and short.any():
                counted = at_targets(
                    recent, split, stage, at[short], choice.days, choice.idle, int(label)
                )
                fresh = recent_feature(counted, choice.scale)
                scores[short] = blend_recent(scores[short], fresh, choice.weight)
            ranks.append(_checked_ranks(TRENDING, scores, chunk, targets[at], split.n_items)[0])
        rank = np.concatenate(ranks)
        metrics = metrics_from_ranks(rank)
        rows_out[label] = {
            "hr@10": metrics["hr@10"],
            "ndcg@10": metrics["ndcg@10"],
            "users": len(hist),
        }
        per_user[label] = ndcg_per_user(rank)
    return rows_out, per_user


def mean_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Average numeric metrics over seeds; keep each seed's figures and the spread of NDCG@10."""
    merged: dict[str, Any] = dict(runs[0])
    averaged = (
        *METRIC_KEYS,
        "latency_ms_p50",
        "latency_ms_p99",
        "ndcg@10_fp32",
        "hr@10_fp32",
        "gen_same_users_ndcg@10",
        "gen_same_users_hr@10",
    )
    for key in (k for k in averaged if all(k in r for r in runs)):
        merged[key] = float(np.mean([r[key] for r in runs]))
    merged["out_of_catalog"] = int(sum(r["out_of_catalog"] for r in runs))
    merged["seen_returned"] = int(sum(r["seen_returned"] for r in runs))
    merged["seeds"] = len(runs)
    merged["ndcg@10_std"] = float(np.std([r["ndcg@10"] for r in runs]))
    kept = (
        "seed",
        "hr@10",
        "ndcg@10",
        "ndcg@10_fp32",
        "fusion_weight",
        "alpha",
        "weights",
        "valid_ndcg@10",
    )
    merged["per_seed"] = [{k: r[k] for k in kept if k in r} for r in runs]
    return merged


def table(report: dict[str, Any]) -> str:
    """A fixed-width text table of the report's models."""
    cols = (*METRIC_KEYS, "latency_ms_p50", "latency_ms_p99")
    header = f"{'model':<12}{'users':>6}" + "".join(f"{c:>15}" for c in cols)
    lines = [header, "-" * len(header)]
    for name, res in report.items():
        if name.startswith("_"):
            continue
        cells = "".join(f"{res[c]:>15.4f}" for c in cols)
        lines.append(f"{name:<12}{res['users']:>6}{cells}")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: each metric, each model side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in report if not n.startswith("_")]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(METRIC_KEYS))
    for j, name in enumerate(names):
        ax.bar(x + j * width, [report[name][m] for m in METRIC_KEYS], width, label=name)
    ax.set_xticks(x + width * (len(names) - 1) / 2, METRIC_KEYS)
    ax.set_ylabel("value (test split)")
    meta = report.get("_meta", {})
    ax.set_title(
        f"{meta.get('dataset', '')}: full-catalog leave-one-out, {meta.get('users', '')} users"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval(
    split: Split,
    models: Sequence[str],
    *,
    seeds: int = 1,
    artifacts: Sequence[Path] = (),
    gen_overrides: dict[str, Any] | None = None,
    gen_minutes: float | None = None,
    rerank_top: int = 20,
    rerank_users: int | None = None,
    post: PostConfig | None = None,
    cold_start_prefixes: Sequence[int] = (),
    retrieval: RetrievalConfig | None = None,
    recent: RecentPopularity | None = None,
    ease_max_items: int | None = None,
    baseline_params: dict[str, dict[str, float]] | None = None,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate ``models`` on the test split; see the module docstring.

    ``baseline_params`` (name -> settings chosen on validation, e.g. by the training of the
    artifact under test) fits those baselines once instead of searching their grids again.

    ``fused`` is the served model: the transformer, EASE, item-kNN and popularity fused with
    weights chosen on validation (:class:`lab.hybrid.Fusion`), per seed.

    ``cold_start_prefixes`` adds the cold-start protocol (:func:`cold_start`) for gen+ease with
    and without retrieval (its weight and threshold fitted on validation per seed, or
    ``retrieval`` when given), in the report's ``"_cold_start"``; with ``recent`` (the
    dataset's interaction times) also gen+ease blended with recent popularity: each artifact's
    own blend (what its training chose with both guards), else one chosen here on held-out users
    (:func:`lab.trending.heldout_grid`, EASE with its settings here).
    """
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise InferenceError(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    report: dict[str, Any] = {}
    per_user: dict[str, np.ndarray] = {}
    fitted: dict[str, Ranker] = {}
    chosen = baseline_params or {}

    def fit_baseline(name: str) -> Ranker:
        if name not in fitted:
            fitted[name] = baseline(
                name, split, say, ease_max_items=ease_max_items, params=chosen.get(name)
            )
        return fitted[name]

    for name in (m for m in models if m in BASELINES):
        model = fit_baseline(name)
        report[name], per_user[name] = evaluate(model, split)
        say(f"{name}: test ndcg@10={report[name]['ndcg@10']:.4f} hr@10={report[name]['hr@10']:.4f}")
    gens = []
    if {"gen", "gen+ease", "fused", "gen+ease+post", "gen+rerank"} & set(models) or (
        cold_start_prefixes
    ):
        gens = list(
            _gen_models(
                split,
                seeds=seeds,
                artifacts=artifacts,
                overrides=gen_overrides,
                minutes=gen_minutes,
                say=say,
            )
        )
    # The transformer's test scores are computed once per batch for every model built on it.
    gens = [(seed, SharedScores(rec), fp32) for seed, rec, fp32 in gens]
    fusions: list[tuple[int, CatalogScorer, dict[str, Any]]] = []
    if "fused" in models:
        from lab.hybrid import Fusion

        parts = {name: fit_baseline(name) for name in ("ease", "itemknn", "pop")}
        for seed, rec, _ in gens:
            fusion = Fusion({"gen": rec, **parts}).fit(split)
            fusions.append((seed, fusion, {"weights": fusion.weights, **_fusion_valid(fusion)}))
    hybrids: list[tuple[int, CatalogScorer]] = []
    if {"gen+ease", "gen+ease+post"} & set(models) or cold_start_prefixes:
        from lab.hybrid import Hybrid

        ease = fit_baseline("ease")
        hybrids = [(seed, Hybrid(ease, rec).fit(split)) for seed, rec, _ in gens]
    served: list[tuple[int, Any, dict[str, Any]]] = []
    if "served" in models:
        if not artifacts:
            raise InferenceError("the served model is read from --artifact")
        served = list(_served_models(split, artifacts))
    tested: dict[int, tuple[dict[str, Any], np.ndarray]] = {}
    for i, (_, rec, _) in enumerate(gens):
        together: dict[str, CatalogScorer] = {}
        if i < len(served) and _share_transformer(served[i][1], rec, split):
            together["served"] = served[i][1]
        if "gen" in models:
            together["gen"] = rec
        if fusions:
            together["fused"] = fusions[i][1]
        if "gen+ease" in models:
            together["gen+ease"] = hybrids[i][1]
        for name, result in evaluate_together(together, split).items():
            tested[id(together[name])] = result
    if "gen" in models:
        runs, users = [], []
        for seed, rec, fp32 in gens:
            res, nd = tested[id(rec)]
            res["seed"] = seed
            fp32_res, _ = evaluate(fp32, split, latency_users=0)
            res["ndcg@10_fp32"] = fp32_res["ndcg@10"]
            res["hr@10_fp32"] = fp32_res["hr@10"]
            runs.append(res)
            users.append(nd)
            say(
                f"gen seed {seed}: test ndcg@10={res['ndcg@10']:.4f} "
                f"(fp32 {res['ndcg@10_fp32']:.4f})"
            )
        report["gen"] = mean_over_seeds(runs)
        report["gen"]["precision"] = getattr(gens[0][1], "precision", "fp32")
        per_user["gen"] = np.mean(users, axis=0)
    if "fused" in models:
        report["fused"], per_user["fused"] = _seed_rows("fused", fusions, split, say, tested)
    if served:
        report["served"], per_user["served"] = _seed_rows("served", served, split, say, tested)
    if hybrids:
        if "gen+ease" in models:
            alphas = [(seed, h, {"alpha": float(getattr(h, "alpha", 0.0))}) for seed, h in hybrids]
            report["gen+ease"], per_user["gen+ease"] = _seed_rows(
                "gen+ease", alphas, split, say, tested
            )
        if "gen+ease+post" in models:
            config = post if post is not None and post.active else PostConfig(cosine_floor=0.0)
            steps = CatalogPost(split.item_ids, _item_vectors(split, artifacts), config)
            settings = config.model_dump()
            report["gen+ease+post"], per_user["gen+ease+post"] = _seed_rows(
                "gen+ease+post",
                [(seed, PostRanked(h, steps), settings) for seed, h in hybrids],
                split,
                say,
            )
        if cold_start_prefixes:
            trending = None
            if recent is not None:
                served_blends = _artifact_blends(artifacts)
                if served_blends is None:
                    _, choice = choose_trending(split, recent, ease, cold_start_prefixes, say)
                    below = max(cold_start_prefixes) + 1
                    served_blends = [(choice, below) for _ in hybrids]
                else:
                    say(
                        "recent popularity: each artifact's own blend, "
                        + "; ".join(f"{describe_blend(c)} ({c.scale})" for c, _ in served_blends)
                    )
                trending = (recent, served_blends)
            report["_cold_start"] = _cold_start_report(
                hybrids,
                split,
                artifacts,
                cold_start_prefixes,
                retrieval,
                trending=trending,
                say=say,
            )
    if "gen+rerank" in models:
        from lab.gen_rerank import GenRerank

        # The language model costs seconds per user on CPU, so it may run on the first
        # ``rerank_users`` users only; gen is then re-scored on exactly those users for the
        # paired comparison.
        n = len(split.eval_users) if rerank_users is None else rerank_users
        sub = split.subset(n)
        runs, users, gen_users = [], [], []
        for seed, rec, _ in gens:
            combo = GenRerank(rec, split, top_n=rerank_top, say=say, tune_users=min(n, 200))
            combo.fit(sub)
            res, nd = evaluate(combo, sub, latency_users=min(n, 20))
            gen_sub, gen_nd = evaluate(rec, sub, latency_users=0)
            res["seed"] = seed
            res["fusion_weight"] = combo.weight
            res["gen_same_users_ndcg@10"] = gen_sub["ndcg@10"]
            res["gen_same_users_hr@10"] = gen_sub["hr@10"]
            runs.append(res)
            users.append(nd)
            gen_users.append(gen_nd)
            say(
                f"gen+rerank seed {seed}: test ndcg@10={res['ndcg@10']:.4f} on {n} users "
                f"(gen on the same users {gen_sub['ndcg@10']:.4f}, fusion weight {combo.weight})"
            )
        report["gen+rerank"] = mean_over_seeds(runs)
        per_user["gen+rerank"] = np.mean(users, axis=0)
        report["gen+rerank"]["vs_gen_same_users"] = significance(
            per_user["gen+rerank"], np.mean(gen_users, axis=0)
        )
    present = [b for b in BASELINES if b in report]
    meta: dict[str, Any] = {
        "dataset": split.dataset,
        "baselines_tuned": {
            name: ("settings chosen in training" if name in chosen else "grid")
            for name in fitted
            if name in GRIDS
        },
        "sha256": dict(split.sha256),
        "users": len(split.eval_users),
        "items": split.n_items,
        "protocol": (
            "time-ordered leave-one-out, full catalog, seen masked; P@5=hit@5/5, R@10=HR@10"
        ),
        "out_of_catalog_total": int(
            sum(r["out_of_catalog"] for name, r in report.items() if not name.startswith("_"))
        ),
    }
    if present:
        best = max(present, key=lambda b: report[b]["ndcg@10"])
        meta["best_baseline"] = best
        for name in COMPARED:
            if name in report:
                ours = per_user[name]
                theirs = per_user[best][: len(ours)]  # same users, same order
                sig = significance(ours, theirs)
                sig["ndcg_gain_pct"] = 100.0 * (float(ours.mean()) / float(theirs.mean()) - 1.0)
                report[name]["vs_best_baseline"] = {"baseline": best, **sig}
    singles = [m for m in (*BASELINES, "gen") if m in report]
    for name in (n for n in ("fused", "served") if n in report and singles):
        # The strictest comparison: the single model that did best on the test split itself.
        top = max(singles, key=lambda m: report[m]["ndcg@10"])
        sig = significance(per_user[name], per_user[top])
        sig["ndcg_gain_pct"] = 100.0 * (
            float(per_user[name].mean()) / max(float(per_user[top].mean()), 1e-12) - 1.0
        )
        report[name]["vs_best_single"] = {"model": top, **sig}
    report["_meta"] = meta
    return report


def _cold_start_report(
    hybrids: Sequence[tuple[int, CatalogScorer]],
    split: Split,
    artifacts: Sequence[Path],
    prefixes: Sequence[int],
    chosen: RetrievalConfig | None,
    *,
    trending: tuple[RecentPopularity, list[tuple[TrendingChoice, int]]] | None = None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """gen+ease with and without retrieval (and with recent popularity, given ``trending``: the
    counts and, per seed, the blend and the history length it applies below) under the
    cold-start protocol, averaged over seeds."""
    from inference.index import ItemIndex
    from lab.hybrid import fit_retrieval

    text = TextRetrieval(
        ItemIndex.build(split.item_ids, _item_vectors(split, artifacts)), split.item_ids
    )
    runs: list[dict[str, dict[str, Any]]] = []
    users: list[dict[str, dict[str, np.ndarray]]] = []
    configs = []
    for n, (seed, hybrid) in enumerate(hybrids):
        config = chosen if chosen is not None else fit_retrieval(hybrid, text, split)
        configs.append({"seed": seed, **config.to_json()})
        say(
            f"retrieval seed {seed}: weight {config.weight}, below {config.max_history} items"
            + (" (given)" if chosen is not None else " (fitted on validation)")
        )
        variants = {"gen+ease": hybrid, RETRIEVED: RetrievalBlend(hybrid, text, config)}
        rows, per_user = cold_start(variants, split, prefixes)
        if trending is not None:
            recent, blends = trending
            choice, below = blends[n]
            blended, blended_users = trending_cold_start(
                hybrid, split, prefixes, recent, choice, below=below
            )
            for label, row in blended.items():
                if row:
                    rows[label][TRENDING] = row
                    per_user[label][TRENDING] = blended_users[label]
        runs.append(rows)
        users.append(per_user)
    out: dict[str, Any] = {"prefixes": list(prefixes), "retrieval": configs, "rows": {}}
    if trending is not None:
        out["trending"] = [
            {"seed": seed, **asdict(choice), "below": below}
            for (seed, _), (choice, below) in zip(hybrids, trending[1], strict=True)
        ]
    for label, row in runs[0].items():
        merged: dict[str, Any] = {}
        for name in row:
            merged[name] = {
                "hr@10": float(np.mean([r[label][name]["hr@10"] for r in runs])),
                "ndcg@10": float(np.mean([r[label][name]["ndcg@10"] for r in runs])),
                "users": row[name]["users"],
                "per_seed_ndcg@10": [r[label][name]["ndcg@10"] for r in runs],
            }
        if merged:
            theirs = np.mean([u[label]["gen+ease"] for u in users], axis=0)
            for name, key in (
                (RETRIEVED, "retrieval_vs_gen+ease"),
                (TRENDING, "trending_vs_gen+ease"),
            ):
                if name in row:
                    ours = np.mean([u[label][name] for u in users], axis=0)
                    sig = significance(ours, theirs)
                    base = float(theirs.mean())
                    sig["ndcg_gain_pct"] = (
                        100.0 * (float(ours.mean()) / base - 1.0) if base else 0.0
                    )
                    merged[key] = sig
        out["rows"][label] = merged
    return out


def _artifact_blends(artifacts: Sequence[Path]) -> list[tuple[TrendingChoice, int]] | None:
    """Each artifact's served recent-popularity blend (what ``recstream train`` chose, with the
    history length it applies below), or ``None`` when there are no artifacts or one has no
    ``"trending"`` section (trained without the hybrid, or before the blend existed)."""
    from inference.artifact import read_trending

    out = []
    for path in artifacts:
        config = read_trending(path)
        if not config.below:
            return None
        gains = tuple(g for g in (config.next_gain, config.served_next_gain) if g is not None)
        choice = TrendingChoice(
            float(config.days),
            config.weight,
            config.gain or 0.0,
            gains,
            config.scale,
            float(config.idle_s),
        )
        out.append((choice, config.below))
    return out or None


def choose_trending(  # noqa: PLR0917 - the protocol's parts, all named at the call
    split: Split,
    recent: RecentPopularity,
    ease: Ranker,
    prefixes: Sequence[int],
    say: Callable[[str], None],
    served: Callable[[Split], CatalogScorer] | None = None,
    record: list[dict[str, Any]] | None = None,
) -> tuple[RecentPopularity, TrendingChoice]:
    """The recent-popularity blend chosen on held-out users, with ``ease``'s settings: the
    largest gain on their later items that costs EASE nothing on their next ones, nor, with
    ``served`` (which fits the served model without a fold's users), the served model on one
    fold's next items; for every list of a short history or only for returning users
    (:data:`lab.trending.IDLES`). ``record`` gets every blend's changes (:func:`trending_grid`)."""
    from lab.training import ease_teacher
    from lab.trending import DAYS, IDLES, NEXT_ITEMS, WEIGHTS, choose, heldout_grid

    assert isinstance(ease, EASE)
    fit = ease_teacher(ease.params())
    later = heldout_grid(split, recent, fit, prefixes, DAYS, WEIGHTS, idles=IDLES)

    def upcoming(model: Callable[[Split], CatalogScorer], folds: int | None) -> dict[Cell, Any]:
        return heldout_grid(
            split,
            recent,
            model,
            prefixes,
            DAYS,
            WEIGHTS,
            targets=NEXT_ITEMS,
            upcoming=True,
            judged_folds=folds,
            idles=IDLES,
        )

    guards = [upcoming(fit, None)]
    if served is not None:
        guards.append(upcoming(served, 1))
    choice = choose(later, prefixes, DAYS, WEIGHTS, guards=guards, idles=IDLES)
    if record is not None:
        record.extend(trending_grid(later, guards, prefixes, (DAYS, WEIGHTS, IDLES)))
    if len(guards) > 1:
        alone = choose(later, prefixes, DAYS, WEIGHTS, guards=guards[:1], idles=IDLES)
        if (alone.days, alone.weight, alone.idle) != (choice.days, choice.weight, choice.idle):
            there = prefix_changes(guards[1], prefixes, alone.days, alone.weight, alone.idle)
            say(
                f"recent popularity: EASE's guard alone would keep {describe_blend(alone)}; "
                "the served model's next items there: "
                + " / ".join(f"{c:+.1%} (se {se:.1%})" for c, se in there)
                + f" on the first {' / '.join(map(str, prefixes))} items"
            )
    nexts = "".join(
        f", the next items {gain:+.1%} ({judge})"
        for gain, judge in zip(choice.next_gains, ("EASE", "served"), strict=False)
    )
    say(
        f"recent popularity: {describe_blend(choice)} below {max(prefixes) + 1} items "
        f"(held-out users, mean change {choice.gain:+.1%}{nexts})"
    )
    return recent, choice


def describe_blend(choice: TrendingChoice) -> str:
    """A blend in words: its window, weight and whom it is served to."""
    whom = f", to users away {choice.idle / 3600:g} h or more" if choice.idle else ""
    return f"{choice.days:g} days, weight {choice.weight:g}{whom}"


def trending_grid(
    later: dict[Cell, np.ndarray],
    guards: Sequence[dict[Cell, np.ndarray]],
    prefixes: Sequence[int],
    axes: tuple[Sequence[float], Sequence[float], Sequence[float]],
) -> list[dict[str, Any]]:
    """Every blend of a held-out grid with its mean change on the later items and, by each guard,
    on the next ones, per prefix (what :func:`lab.trending.choose` chose among, for
    ``training.json``)."""
    out = []
    days, weights, idles = axes
    for idle in idles:
        for d in days:
            for w in weights:
                cell = (float(d), float(w), float(idle))
                out.append(
                    {
                        "days": cell[0],
                        "weight": cell[1],
                        "idle_s": cell[2],
                        "later": [round(c, 4) for c, _ in prefix_changes(later, prefixes, *cell)],
                        "next": [
                            [round(c, 4) for c, _ in prefix_changes(g, prefixes, *cell)]
                            for g in guards
                        ],
                    }
                )
    return out


def cold_start_table(section: dict[str, Any]) -> str:
    """The cold-start rows as text: NDCG@10 per prefix of gen+ease alone, with retrieval and,
    when measured, with recent popularity (change against gen+ease and its Wilcoxon p)."""
    blends = [
        (RETRIEVED, "retrieval_vs_gen+ease", "+retr"),
        (TRENDING, "trending_vs_gen+ease", "+trend"),
    ]
    rows = {label: row for label, row in section["rows"].items() if row}
    shown = [b for b in blends if any(b[0] in row for row in rows.values())]
    header = f"{'history':<9}{'users':>6}{'gen+ease':>10}" + "".join(
        f"{short:>9}{'gain %':>8}{'p':>9}" for _, _, short in shown
    )
    lines = [header, "-" * len(header)]
    for label, row in rows.items():
        cells = f"{label:<9}{row['gen+ease']['users']:>6}{row['gen+ease']['ndcg@10']:>10.4f}"
        for name, key, _ in shown:
            gain, p = row[key]["ndcg_gain_pct"], row[key]["wilcoxon_p"]
            cells += f"{row[name]['ndcg@10']:>9.4f}{gain:>+8.1f}{p:>9.2g}"
        lines.append(cells)
    return "\n".join(lines)


def _served_models(
    split: Split, artifacts: Sequence[Path]
) -> Iterator[tuple[int, CatalogScorer, dict[str, Any]]]:
    """Each artifact exactly as a worker serves it (fusion, pruned EASE, INT8, retrieval)."""
    import json

    from inference.artifact import load_recommender

    for path in artifacts:
        rec = load_recommender(path)
        if rec.item_ids != split.item_ids:
            raise InferenceError(f"artifact {path} was not trained on {split.dataset}")
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        section = config.get("hybrid") or {}
        extra = {"served": rec.name, "weights": rec.weights}
        if "valid_ndcg@10" in section:
            extra["valid_ndcg@10"] = section["valid_ndcg@10"]
        yield int(rec.scorer.cfg.seed), rec, extra


def _share_transformer(served: Any, shared: CatalogScorer, split: Split) -> bool:
    """Let the served artifact's transformer answer from ``shared`` (the same artifact's
    transformer, loaded the same way for the ``gen`` row), after checking on a few validation
    histories that both score alike; ``False`` (nothing changed) when they do not."""
    probe = split.histories("valid")[:8]
    if not isinstance(shared, SharedScores) or not probe:
        return False
    if not np.array_equal(served.scorer.score(probe), shared.base.score(probe)):
        return False
    served.scorer = shared  # the served path is unchanged; its transformer scores come once
    return True


def _fusion_valid(fusion: Any) -> dict[str, Any]:
    """The fusion's validation NDCG@10 (each part alone and fused) for the report."""
    return {"valid_ndcg@10": dict(fusion.valid_ndcg), "fit_users": fusion.fit_users}


def _seed_rows(
    name: str,
    models: Sequence[tuple[int, CatalogScorer, dict[str, Any]]],
    split: Split,
    say: Callable[[str], None],
    tested: dict[int, tuple[dict[str, Any], np.ndarray]] | None = None,
) -> tuple[dict[str, Any], np.ndarray]:
    """One model's report row over seeds (each run notes ``extra``) and its per-user NDCG;
    ``tested`` holds the models already evaluated (by ``id``)."""
    runs, users = [], []
    for seed, model, extra in models:
        res, nd = (tested or {}).get(id(model)) or evaluate(model, split)
        res.update(seed=seed, **extra)
        runs.append(res)
        users.append(nd)
        say(f"{name} seed {seed}: test ndcg@10={res['ndcg@10']:.4f} {extra}")
    return mean_over_seeds(runs), np.mean(users, axis=0)


class PostRanked:
    """A scorer whose best items are the served post-processed list, in its order.

    Only the first ``depth`` positions are the served list; the rest keep the model's order
    below them. (When the floor leaves fewer than ``depth`` items, the model's next items fill
    the gap, so a very high floor is judged a little kindly.)
    """

    def __init__(self, base: CatalogScorer, steps: CatalogPost, depth: int = 10) -> None:
        self.base, self.steps, self.depth = base, steps, depth
        self.name = f"{base.name}+post"
        self.n_items = base.n_items

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        scores = self.base.score(histories)
        out = np.asarray(scores, dtype=np.float32).copy()
        for row, history in enumerate(histories):
            top, _ = self.steps.top(scores[row], np.asarray(history, dtype=np.int64), self.depth)
            lift = float(np.abs(out[row]).max()) + 1.0
            out[row, top] = lift + np.arange(len(top), 0, -1, dtype=np.float32)
        return out


def _item_vectors(split: Split, artifacts: Sequence[Path]) -> np.ndarray:
    """Item text embeddings in catalog order: the first artifact's index, else MiniLM now."""
    if artifacts:
        from inference.artifact import read_item_index

        index = read_item_index(artifacts[0])
        return index.vectors(split.item_ids)
    from inference.embeddings import catalog_vectors

    return catalog_vectors(split.item_ids, split.items)


def _gen_models(
    split: Split,
    *,
    seeds: int,
    artifacts: Sequence[Path],
    overrides: dict[str, Any] | None,
    minutes: float | None,
    say: Callable[[str], None],
) -> Iterator[tuple[int, CatalogScorer, CatalogScorer]]:
    """Yield ``(seed, served model, fp32 model)`` per seed: loaded artifacts or fresh training."""
    from inference.artifact import load_recommender
    from inference.generative import GenConfig, GenScorer
    from lab.training import train_gen

    if artifacts:
        for path in artifacts:
            # The transformer alone: the lab rebuilds the hybrid and retrieval around it.
            loaded = load_recommender(path, hybrid=False, retrieval=False)
            if loaded.item_ids != split.item_ids or loaded.manifest.get(
                "training_data_sha256"
            ) != dict(split.sha256):
                raise InferenceError(f"artifact {path} was not trained on {split.dataset}")
            full = load_recommender(path, quantize=False, hybrid=False, retrieval=False)
            yield int(loaded.scorer.cfg.seed), loaded.scorer, full.scorer
        return
    from inference.generative import quantize_int8

    text = None
    for seed in range(seeds):
        cfg = GenConfig(seed=seed, **{**gen_preset(split.dataset), **(overrides or {})})
        if cfg.text_init and text is None:
            from inference.embeddings import catalog_vectors

            text = catalog_vectors(split.item_ids, split.items)
        model, log = train_gen(
            split,
            cfg,
            text_embeddings=text,
            time_budget_s=None if minutes is None else minutes * 60,
            say=say,
        )
        say(
            f"gen seed {seed}: best valid ndcg@10 {log['valid_ndcg@10']:.4f} "
            f"at epoch {log['best_epoch']} in {log['train_seconds']:.0f}s"
        )
        fp32 = GenScorer(model, cfg)
        yield seed, GenScorer(quantize_int8(model), cfg, precision="int8"), fp32
