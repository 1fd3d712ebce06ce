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


def test_a_baseline_takes_settings_chosen_in_training_without_searching_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from lab import evaluate
    from lab.baselines import EASE, ItemKNN
    from lab.datasets import Dataset, Interaction, Item
    from lab.protocol import leave_one_out

    rows = [
        Interaction(f"u{u}", f"i{(u + step * 3) % 12}", float(u * 100 + step))
        for u in range(30)
        for step in range(5)
    ]
    split = leave_one_out(Dataset("d", rows, {f"i{i}": Item(f"i{i}", f"i{i}") for i in range(12)}))

    def no_grid(*_: object, **__: object) -> None:
        raise AssertionError("the grid was searched")

    monkeypatch.setattr(evaluate, "tune", no_grid)
    settings = {"lam": 50.0, "decay": 0.8, "beta": 2.0, "markov_last": 1.0, "max_items": 5.0}
    ease = evaluate.baseline("ease", split, lambda _: None, params=settings)
    assert isinstance(ease, EASE)
    assert (ease.lam, ease.decay, ease.beta, ease.markov_last) == (50.0, 0.8, 2.0, 1)
    assert isinstance(ease.markov_last, int)
    assert len(ease.kept) == 5  # the bound the training solved for
    assert ease.score([np.array([0, 3])]).shape == (1, split.n_items)
    knn = evaluate.baseline(
        "itemknn", split, lambda _: None, params={"k_neighbours": 4.0, "decay": 0.7}
    )
    assert isinstance(knn, ItemKNN)
    assert (knn.k_neighbours, knn.decay) == (4, 0.7)
    assert np.diff(knn.sim.indptr).max() <= 4


def test_models_evaluated_together_score_the_shared_part_once_and_match_alone() -> None:
    from lab.datasets import Dataset, Interaction, Item
    from lab.evaluate import SharedScores, evaluate, evaluate_together
    from lab.hybrid import Hybrid
    from lab.protocol import leave_one_out

    rows = [
        Interaction(f"u{u}", f"i{(u * 7 + step * 3) % 20}", float(u * 100 + step))
        for u in range(40)
        for step in range(6)
    ]
    items = {f"i{i}": Item(f"i{i}", f"i{i}") for i in range(20)}
    split = leave_one_out(Dataset("d", rows, items))

    class Counted:
        name, n_items, calls = "gen", split.n_items, 0

        def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
            self.calls += 1
            return np.stack([np.cos(np.arange(self.n_items) * (len(h) + h[-1])) for h in histories])

    class Last:
        name, n_items = "cf", split.n_items

        def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
            out = np.zeros((len(histories), self.n_items), dtype=np.float32)
            for row, h in enumerate(histories):
                out[row, (h[-1] + 1) % self.n_items] = 1.0
            return out

    alone = {
        "gen": evaluate(Counted(), split, batch_size=8, latency_users=0),
        "gen+cf": evaluate(Hybrid(Last(), Counted(), 0.4), split, batch_size=8, latency_users=0),
    }
    counted = Counted()
    shared = SharedScores(counted)
    together = evaluate_together(
        {"gen": shared, "gen+cf": Hybrid(Last(), shared, 0.4)}, split, batch_size=8, latency_users=0
    )
    for name, (result, per_user) in alone.items():
        assert together[name][0]["ndcg@10"] == result["ndcg@10"]
        np.testing.assert_array_equal(together[name][1], per_user)
    batches = -(-len(split.eval_users) // 8)
    assert counted.calls == batches  # once per batch, not once per model
