"""Evaluation report helpers: seed averaging, paired tests, the table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from inference.postprocess import CatalogPost, PostConfig
from inference.scoring import top_k_unseen
from lab.evaluate import PostRanked, mean_over_seeds, significance, table
from lab.protocol import METRIC_KEYS


def _run(seed: int, ndcg: float, fp32: float) -> dict[str, float]:
    base = dict.fromkeys((*METRIC_KEYS, "latency_ms_p50", "latency_ms_p99"), 0.5)
    return {
        **base,
        "ndcg@10": ndcg,
        "ndcg@10_fp32": fp32,
        "seed": seed,
        "users": 3,
        "out_of_catalog": 0,
        "seen_returned": 0,
    }


def test_seed_average_covers_int8_and_fp32_figures() -> None:
    merged = mean_over_seeds([_run(0, 0.1, 0.2), _run(1, 0.3, 0.4)])
    assert merged["ndcg@10"] == pytest.approx(0.2)
    assert merged["ndcg@10_fp32"] == pytest.approx(0.3)
    assert merged["ndcg@10_std"] == pytest.approx(0.1)
    assert [s["seed"] for s in merged["per_seed"]] == [0, 1]
    lines = table({"gen": merged, "_meta": {}}).splitlines()
    assert len(lines) == 3 and lines[2].split()[:3] == ["gen", "3", "0.5000"]


def test_paired_tests_detect_a_consistent_gain_and_ignore_no_change() -> None:
    rng = np.random.default_rng(0)
    theirs = rng.random(200)
    assert significance(theirs, theirs)["wilcoxon_p"] == 1.0
    better = significance(theirs + 0.05 + 0.01 * rng.random(200), theirs)
    assert better["mean_diff"] > 0 and better["wilcoxon_p"] < 1e-6


class _Fixed:
    """Scores item i as ``n - i`` for everyone: the model's order is the catalog order."""

    name = "fixed"
    n_items = 6

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.tile(np.arange(6, 0, -1, dtype=np.float32), (len(histories), 1))


def test_post_ranked_puts_the_served_list_first() -> None:
    # Items 0-2 point one way, 3-5 the other; the user saw item 0.
    vectors = np.array([[1, 0]] * 3 + [[0, 1]] * 3, dtype=np.float32)
    ids = [f"i{i}" for i in range(6)]
    history = [np.array([0])]
    floored = PostRanked(_Fixed(), CatalogPost(ids, vectors, PostConfig(cosine_floor=0.5)), 3)
    top, _ = top_k_unseen(floored.score(history), history, 3)
    assert top[0].tolist() == [1, 2, 3]  # the two kept items, then the model's next one
    same = PostRanked(_Fixed(), CatalogPost(ids, vectors, PostConfig(mmr_lambda=1.0)), 3)
    assert top_k_unseen(same.score(history), history, 5)[0][0].tolist() == [1, 2, 3, 4, 5]
