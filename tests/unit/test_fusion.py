"""The served fusion: weights chosen on validation, never below the best single model there,
and served from the artifact with the scores the lab computed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.artifact import load_recommender
from inference.exceptions import ArtifactError
from inference.generative import GenConfig, GenScorer, ItemTransformer
from lab.artifact import save_artifact
from lab.baselines import EASE, ItemKNN, PopularityRanker
from lab.hybrid import Fusion
from lab.protocol import Split, metrics_from_ranks, target_ranks
from tests.unit.tamper import resealed
from tests.unit.test_hybrid import _Noise, _Oracle
from tests.unit.test_hybrid import _split as _cycle_split
from tests.unit.test_hybrid_artifact import N_ITEMS
from tests.unit.test_hybrid_artifact import _split as _walk_split


def _valid_ndcg(model: Fusion, split: Split) -> float:
    hist = split.histories("valid")
    return metrics_from_ranks(target_ranks(model.score(hist), hist, split.targets("valid")))[
        "ndcg@10"
    ]


def test_an_oracle_alone_wins_over_noise() -> None:
    split = _cycle_split()
    noise = _Noise(split.n_items, 1)
    fusion = Fusion({"ease": noise, "itemknn": _Oracle(split)}).fit(split)
    assert fusion.weights["itemknn"] == 1.0
    assert fusion.name == "itemknn"
    assert fusion.valid_ndcg["fused"] == fusion.valid_ndcg["itemknn"] == 1.0


@pytest.fixture(scope="module")
def walk() -> tuple[Split, dict[str, object]]:
    split = _walk_split()
    torch.manual_seed(0)
    cfg = GenConfig(n_items=split.n_items, hidden=16, layers=1, heads=2, ffn=32, max_len=8)
    parts: dict[str, object] = {
        "gen": GenScorer(ItemTransformer(cfg).eval(), cfg),
        "ease": EASE(lam=10.0, decay=0.9, beta=0.5, markov_last=2).fit(split),
        "itemknn": ItemKNN(k_neighbours=5, decay=0.8).fit(split),
        "pop": PopularityRanker().fit(split),
    }
    return split, parts


def test_fitted_fusion_is_at_least_the_best_single_model_on_validation(
    walk: tuple[Split, dict[str, object]],
) -> None:
    split, parts = walk
    fusion = Fusion(parts).fit(split)  # type: ignore[arg-type]
    singles = {n: fusion.valid_ndcg[n] for n in parts}
    assert fusion.valid_ndcg["fused"] >= max(singles.values())
    # The recorded numbers are the real ones: re-scoring gives the same validation NDCG@10.
    assert _valid_ndcg(fusion, split) == pytest.approx(fusion.valid_ndcg["fused"], abs=1e-9)
    assert abs(sum(fusion.weights.values()) - 1.0) < 1e-9
    # The trace starts with every part alone.
    assert [t["weights"] for t in fusion.trace[:4]] == [{n: 1.0} for n in parts]


def test_served_fusion_equals_the_lab_fusion(
    tmp_path: Path, walk: tuple[Split, dict[str, object]]
) -> None:
    split, parts = walk
    weights = {"gen": 0.4, "ease": 0.3, "itemknn": 0.2, "pop": 0.1}
    fusion = Fusion(parts, weights)  # type: ignore[arg-type]
    gen = parts["gen"]
    assert isinstance(gen, GenScorer)
    save_artifact(
        tmp_path / "art", gen.model, split, {"note": "test"}, hybrid=fusion, cf_top_k=N_ITEMS
    )
    config = json.loads((tmp_path / "art" / "config.json").read_text(encoding="utf-8"))
    assert config["model"] == "gen+ease+itemknn+pop"
    assert config["hybrid"]["fusion"] == weights
    rec = load_recommender(tmp_path / "art", device="cpu", quantize=False, trust=_unsigned())
    assert rec.name == "gen+ease+itemknn+pop"
    hist = split.histories("test")
    np.testing.assert_allclose(rec.score(hist), fusion.score(hist), rtol=0, atol=1e-4)


def test_a_fusion_without_the_transformer_serves_cf_only_and_bad_weights_are_refused(
    tmp_path: Path, walk: tuple[Split, dict[str, object]]
) -> None:
    split, parts = walk
    fusion = Fusion(parts, {"gen": 0.0, "itemknn": 1.0})  # type: ignore[arg-type]
    gen = parts["gen"]
    assert isinstance(gen, GenScorer)
    folder = tmp_path / "knn"
    save_artifact(folder, gen.model, split, {}, hybrid=fusion)
    rec = load_recommender(folder, device="cpu", quantize=False, trust=_unsigned())
    assert rec.name == "itemknn"
    hist = split.histories("test")
    np.testing.assert_allclose(rec.score(hist), fusion.score(hist), rtol=0, atol=1e-5)
    # A weight outside [0, 1] in the config is refused (here with the manifest re-written, as an
    # attacker holding the signing key could; the signature check is tested elsewhere).
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["hybrid"]["fusion"]["itemknn"] = 7.0
    changed = resealed(folder, tmp_path / "changed", config)
    with pytest.raises(ArtifactError, match="fusion"):
        load_recommender(changed, device="cpu", quantize=False, trust=_unsigned())


def _unsigned():  # type: ignore[no-untyped-def]
    from inference.settings import ArtifactTrust

    return ArtifactTrust().model_copy(update={"allow_unsigned": True})


def test_a_refitted_fusion_keeps_its_weights_and_settings_and_sees_only_the_part(
    walk: tuple[Split, dict[str, object]],
) -> None:
    """What judges recent popularity as served: the same fusion fitted on fewer users."""
    from dataclasses import replace

    split, parts = walk
    weights = {"gen": 0.4, "ease": 0.3, "itemknn": 0.0, "pop": 0.3}
    fusion = Fusion(parts, weights)  # type: ignore[arg-type]
    empty = np.zeros(0, dtype=np.int64)
    part = replace(split, train=[empty if u % 2 else s for u, s in enumerate(split.train)])
    given: list[Split] = []

    def gen(fold: Split) -> object:
        given.append(fold)
        return parts["gen"]

    again = fusion.refitted(part, gen)  # type: ignore[arg-type]
    assert given == [part]
    assert again.weights == weights and again.name == fusion.name
    assert set(again.components) == {"gen", "ease", "pop"}  # a weight of 0 is not fitted
    ease, before = again.components["ease"], parts["ease"]
    assert isinstance(ease, EASE) and isinstance(before, EASE)
    assert ease is not before and ease.params() == before.params()
    pop = again.components["pop"]
    assert isinstance(pop, PopularityRanker)
    counts = np.bincount(np.concatenate(part.train), minlength=split.n_items)
    assert np.array_equal(pop.counts, counts.astype(np.float32))
    # EASE learnt from the part only: the held-out users' items change its scores.
    hist = split.histories("valid")[:5]
    assert not np.allclose(ease.score(hist), before.score(hist))
