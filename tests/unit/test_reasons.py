"""Reasons for recommended items: the collaborative parts' exact shares, and the served artifact's
``explain``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from inference.artifact import load_recommender
from inference.generative import GenConfig, GenScorer, ItemTransformer
from inference.hybrid import standardise
from inference.reasons import weight_reasons
from inference.scoring import EaseScorer, ItemKNNScorer
from lab.artifact import save_artifact
from lab.baselines import EASE, ItemKNN
from lab.hybrid import Hybrid
from lab.protocol import Split
from tests.unit.test_hybrid_artifact import _split

ITEMS = 20


@pytest.fixture(scope="module")
def split() -> Split:
    return _split()


@pytest.fixture(scope="module")
def ease(split: Split) -> EASE:
    return EASE(lam=10.0, decay=0.8, beta=0.5, markov_last=2).fit(split)


def _histories(split: Split) -> list[np.ndarray]:
    return [h for h in split.histories("test") if len(h) >= 2][:15]


def test_eases_shares_add_up_to_each_targets_standardised_score(split: Split, ease: EASE) -> None:
    arrays = ease.to_arrays(top_k=ITEMS)
    served = EaseScorer.from_arrays(arrays, ITEMS, lam=10.0, decay=0.8, beta=0.5, markov_last=2)
    targets = np.arange(ITEMS)
    for scorer in (ease, served):  # the lab's dense weights and an artifact's sparse ones
        for history in _histories(split):
            items, shares = scorer.attribute(history, targets)
            assert items.tolist() == sorted(set(history.tolist()))
            z = standardise(scorer.score([history]))[0]
            np.testing.assert_allclose(shares.sum(axis=0), z, atol=1e-4)


def test_item_knns_shares_add_up_to_each_targets_standardised_score(split: Split) -> None:
    knn = ItemKNN(k_neighbours=10, decay=0.7).fit(split)
    scorer = ItemKNNScorer.from_arrays(knn.to_arrays(), ITEMS, decay=0.7)
    targets = np.array([0, 3, 11, 19])
    for history in _histories(split):
        _, shares = scorer.attribute(history, targets)
        z = standardise(scorer.score([history]))[0]
        np.testing.assert_allclose(shares.sum(axis=0), z[targets], atol=1e-4)


class _Fusion:
    def __init__(self, weights: dict[str, float], parts: dict[str, object]) -> None:
        self.weights, self.parts = weights, parts


def test_reasons_are_the_largest_positive_shares_first() -> None:
    # Four items; history a=0 (older), b=1 (newest). Target 2 owes most to a, then b;
    # target 3 owes only b (a pulls it down): a is no reason for it.
    weights = sp.csr_matrix(
        np.array(
            [[0.0, 0.0, 0.9, -0.5], [0.0, 0.0, 0.3, 0.8], [0, 0, 0, 0], [0, 0, 0, 0]],
            dtype=np.float32,
        )
    )
    trans = sp.csr_matrix((4, 4), dtype=np.float32)
    scorer = EaseScorer(weights, trans, lam=1.0, decay=1.0, beta=0.0, markov_last=1)
    history = np.array([0, 1])
    fused = _Fusion({"ease": 1.0, "gen": 2.0, "pop": 0.5}, {"ease": scorer, "pop": object()})
    assert weight_reasons(fused, history, np.array([2, 3])) == [[0, 1], [1]]
    # A fusion with nothing attributable (a transformer alone) gives no reasons.
    assert weight_reasons(_Fusion({"gen": 1.0}, {}), history, np.array([2, 3])) == [[], []]


def test_a_served_hybrid_explains_with_its_users_own_history(
    tmp_path: Path, split: Split, ease: EASE
) -> None:
    torch.manual_seed(0)
    cfg = GenConfig(n_items=split.n_items, hidden=16, layers=1, heads=2, ffn=32, max_len=8)
    model = ItemTransformer(cfg).eval()
    hybrid = Hybrid(ease, GenScorer(model, cfg)).fit(split)
    hybrid.alpha = 0.4
    save_artifact(tmp_path / "hybrid", model, split, {}, hybrid=hybrid, cf_top_k=ITEMS)
    save_artifact(tmp_path / "gen", model, split, {})
    rec = load_recommender(tmp_path / "hybrid", device="cpu", quantize=False)
    gen_only = load_recommender(tmp_path / "gen", device="cpu", quantize=False)
    explained = 0
    for history in _histories(split):
        ids = [split.item_ids[i] for i in history]
        listed = [item for item, _ in rec.recommend([ids], 10)[0]]
        because = rec.explain(ids, [*listed, "not-in-catalog"])
        assert because["not-in-catalog"] == []
        for item in listed:
            assert len(because[item]) <= 3
            assert set(because[item]) <= set(ids)
            assert len(set(because[item])) == len(because[item])
        explained += sum(bool(because[item]) for item in listed)
        assert all(r == [] for r in gen_only.explain(ids, listed).values())
    assert explained > 0
