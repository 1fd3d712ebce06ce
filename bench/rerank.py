"""Benchmark the SmolLM2 reranker: CPU latency (fp32 vs INT8) and whether it improves ranking.

Candidates are the top 20 unseen items of the recency-weighted item-kNN baseline for validation
users of a dataset (time-ordered leave-one-out, DESIGN.md). For each user the script measures:

* latency of one ``score`` call (20 candidates), p50/p99 over users, fp32 and INT8 (CPU);
* NDCG@10 / HR@10 of the validation item under the kNN order, the reranker's order (raw letter
  log-probabilities and calibrated), and a reciprocal-rank fusion of both; a paired Wilcoxon
  signed-rank test per user against the kNN order;
* how far INT8 moves the scores (Spearman rank correlation with fp32, per user).

Run from the repository root: ``nice python -m bench.rerank --dataset ml-100k --users 200``
(``--help`` for options).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
from scipy import stats

from inference.scoring import top_k_unseen
from lab.baselines import ItemKNN
from lab.datasets import Item, load_dataset
from lab.protocol import leave_one_out, ndcg_per_user
from lab.reranker import LLMReranker, RerankerConfig
from recstream.settings import CommonSettings

TOP_N = 20
RRF_C = 10.0


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q))


def rank_in(order: np.ndarray, candidates: np.ndarray, target: int) -> int:
    """0-based rank of ``target`` when ``candidates`` are put in ``order``; TOP_N if absent."""
    hits = np.flatnonzero(candidates[order] == target)
    return int(hits[0]) if hits.size else TOP_N


def rrf(scores: np.ndarray, knn_rank: np.ndarray, weight: float) -> np.ndarray:
    """Reciprocal-rank fusion of the kNN ranks and the reranker's ranks; higher is better."""
    llm_rank = np.empty(len(scores))
    llm_rank[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
    return (1 - weight) / (RRF_C + knn_rank) + weight / (RRF_C + llm_rank)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k", help="dataset name or folder")
    parser.add_argument("--users", type=int, default=200, help="validation users to score")
    parser.add_argument("--latency-users", type=int, default=40, help="users timed one by one")
    parser.add_argument("--batch-size", type=int, default=8, help="batch for quality scoring")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-int8", action="store_true", help="skip the INT8 model")
    parser.add_argument(
        "--shuffle",
        action="store_true",
        help="show the candidates to the model in a random order (tests for position bias)",
    )
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, CommonSettings().data_dir)
    split = leave_one_out(ds)
    items = [split.items.get(i, Item(i, i)) for i in split.item_ids]
    hist_all = split.histories("valid")
    targets_all = split.targets("valid")
    # A fixed, spread-out sample of validation users (every k-th), so runs are comparable.
    pick = np.linspace(0, len(hist_all) - 1, min(args.users, len(hist_all))).astype(int)
    histories = [hist_all[i] for i in pick]
    targets = targets_all[pick]

    knn = ItemKNN().fit(split)
    top, _ = top_k_unseen(knn.score(histories), histories, TOP_N)
    shown = top.copy()
    if args.shuffle:
        rng = np.random.default_rng(0)
        for row in shown:
            rng.shuffle(row)
    in_top = np.array([t in row for t, row in zip(targets, top, strict=True)])
    user_hist = [[items[i] for i in h[-10:]] for h in histories]
    user_cands = [[items[i] for i in row] for row in shown]
    print(
        f"{args.dataset}: {len(histories)} validation users, {len(items)} items; "
        f"validation item among kNN top-{TOP_N}: {in_top.mean():.3f}; "
        f"torch threads {torch.get_num_threads()}"
    )

    variants = [("fp32", False)] + ([] if args.no_int8 else [("int8", True)])
    raw_scores: dict[str, list[np.ndarray]] = {}
    latency: dict[str, list[float]] = {}
    batched_per_user: dict[str, float] = {}
    prior: np.ndarray | None = None
    for name, int8 in variants:
        t0 = time.perf_counter()
        reranker = LLMReranker(RerankerConfig(quantize_int8=int8))
        load_s = time.perf_counter() - t0
        if prior is None:
            prior = reranker.letter_prior(TOP_N)
        reranker.score(user_hist[0], user_cands[0])  # warm-up
        times = []
        for h, c in zip(
            user_hist[: args.latency_users], user_cands[: args.latency_users], strict=True
        ):
            t0 = time.perf_counter()
            reranker.score(h, c)
            times.append(time.perf_counter() - t0)
        latency[name] = times
        t0 = time.perf_counter()
        raw_scores[name] = reranker.score_batch(
            user_hist, user_cands, batch_size=args.batch_size, calibrate=False
        )
        batched_per_user[name] = (time.perf_counter() - t0) / len(user_hist)
        print(f"  {name}: loaded in {load_s:.1f}s, scored {len(user_hist)} users")
        del reranker

    print(f"\nLatency per user ({TOP_N} candidates, CPU)")
    print(f"{'model':<6} {'p50 ms':>9} {'p99 ms':>9} {'batched ms/user':>16}")
    for name, times in latency.items():
        print(
            f"{name:<6} {percentile_ms(times, 50):>9.0f} {percentile_ms(times, 99):>9.0f} "
            f"{batched_per_user[name] * 1000:>16.0f}"
        )

    assert prior is not None
    base_rank = np.array(
        [rank_in(np.arange(TOP_N), row, t) for row, t in zip(top, targets, strict=True)]
    )
    base = ndcg_per_user(base_rank)
    rows = [("kNN order", base, base_rank)]
    if args.shuffle:
        shown_rank = np.array(
            [rank_in(np.arange(TOP_N), row, t) for row, t in zip(shown, targets, strict=True)]
        )
        rows.append(("random order", ndcg_per_user(shown_rank), shown_rank))
    # kNN rank of each candidate in the order the model saw them.
    knn_rank = [
        np.array([list(row).index(i) for i in seen], dtype=np.float64)
        for row, seen in zip(top, shown, strict=True)
    ]
    for name, scores in raw_scores.items():
        for label, adjust in (("raw", 0.0), ("calibrated", 1.0)):
            ranks = np.array(
                [
                    rank_in(np.argsort(-(s - adjust * prior), kind="stable"), row, t)
                    for s, row, t in zip(scores, shown, targets, strict=True)
                ]
            )
            rows.append((f"{name} {label}", ndcg_per_user(ranks), ranks))
        for w in (0.25, 0.5):
            ranks = np.array(
                [
                    rank_in(np.argsort(-rrf(s, kr, w), kind="stable"), row, t)
                    for s, kr, row, t in zip(scores, knn_rank, shown, targets, strict=True)
                ]
            )
            rows.append((f"{name} raw fused w={w}", ndcg_per_user(ranks), ranks))

    print(f"\nRanking the kNN top-{TOP_N} of {len(targets)} validation users ({args.dataset})")
    print(f"{'order':<22} {'NDCG@10':>8} {'HR@10':>7} {'vs kNN':>8} {'Wilcoxon p':>11}")
    for label, ndcg, ranks in rows:
        diff = ndcg - base
        p = (
            float(stats.wilcoxon(ndcg, base, zero_method="zsplit").pvalue)
            if np.any(diff != 0)
            else 1.0
        )
        rel = (ndcg.mean() / base.mean() - 1) * 100 if base.mean() > 0 else float("nan")
        print(
            f"{label:<22} {ndcg.mean():>8.4f} {np.mean(ranks < 10):>7.3f} {rel:>+7.1f}% {p:>11.3g}"
        )

    if "int8" in raw_scores:
        rho = [
            float(stats.spearmanr(a, b).statistic)
            for a, b in zip(raw_scores["fp32"], raw_scores["int8"], strict=True)
        ]
        print(f"\nINT8 vs fp32 letter scores: median Spearman rho {np.median(rho):.3f}")


if __name__ == "__main__":
    main()
