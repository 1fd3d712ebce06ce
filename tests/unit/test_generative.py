"""The generative transformer on a slice of ML-100K: learns, stays in the catalog, ships safely.

One tiny model is trained once per session (seconds) and shared by the tests.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from inference.artifact import load_recommender
from inference.exceptions import ArtifactError
from inference.generative import GenConfig, GenScorer, ItemTransformer, quantize_int8
from inference.postprocess import CatalogPost, PostConfig
from lab.artifact import save_artifact
from lab.baselines import EASE, PopularityRanker
from lab.datasets import Dataset, load_dataset
from lab.gen_rerank import GenRerank, fuse
from lab.protocol import Split, leave_one_out, metrics_from_ranks, target_ranks
from lab.training import (
    Distillation,
    GenRanker,
    distillation,
    ease_teacher,
    future_loss,
    sampled_loss,
    teacher_targets,
    train_gen,
    training_windows,
)
from recstream.settings import CommonSettings
from tests.unit.tamper import copy_artifact, flip_last_byte

SLICE_USERS = 200


@pytest.fixture(scope="session")
def small_split() -> Split:
    full = load_dataset("ml-100k", CommonSettings().data_dir)
    keep = set(full.users[:SLICE_USERS])
    inter = [it for it in full.interactions if it.user_id in keep]
    return leave_one_out(Dataset("ml-100k-slice", inter, full.items, dict(full.sha256)))


@pytest.fixture(scope="session")
def trained(small_split: Split) -> tuple[ItemTransformer, GenConfig, dict[str, object]]:
    cfg = GenConfig(
        hidden=32, layers=1, heads=2, ffn=64, max_len=30, batch_size=32, epochs=4, lr=5e-3
    )
    model, log = train_gen(small_split, cfg, progress=False, say=lambda _: None)
    return model, cfg, log


def _test_ndcg(scores: np.ndarray, split: Split) -> float:
    hist = split.histories("test")
    return metrics_from_ranks(target_ranks(scores, hist, split.targets("test")))["ndcg@10"]


def test_training_is_deterministic_and_beats_popularity(
    small_split: Split, trained: tuple[ItemTransformer, GenConfig, dict[str, object]]
) -> None:
    model, cfg, log = trained
    hist = small_split.histories("test")
    gen = _test_ndcg(GenScorer(model, cfg).score(hist), small_split)
    pop = _test_ndcg(PopularityRanker().fit(small_split).score(hist), small_split)
    assert gen > pop, (gen, pop)
    # Same seed, same data: the same first-epoch loss.
    again_cfg = GenConfig(**{**cfg.to_json(), "epochs": 1})
    _, again = train_gen(small_split, again_cfg, progress=False, say=lambda _: None)
    first = log["history"][0]  # type: ignore[index]
    assert again["history"][0]["loss"] == pytest.approx(first["loss"], rel=1e-6)


def test_recommendations_stay_in_catalog_and_skip_seen_items(
    small_split: Split, trained: tuple[ItemTransformer, GenConfig, dict[str, object]]
) -> None:
    model, cfg, _ = trained
    rec = GenRanker(model, cfg)
    hist = small_split.histories("test")
    top, scores = rec.recommend(hist, 20)
    assert top.shape == (len(hist), 20)
    assert ((top >= 0) & (top < small_split.n_items)).all()
    for row, h in zip(top, hist, strict=True):
        assert not np.isin(row, h).any()
    assert (np.diff(scores, axis=1) <= 0).all()
    # The baselines obey the same contract.
    ease_top, _ = EASE(lam=300).fit(small_split).recommend(hist, 20)
    for row, h in zip(ease_top, hist, strict=True):
        assert not np.isin(row, h).any()


def test_int8_scores_do_not_depend_on_the_batch(
    small_split: Split, trained: tuple[ItemTransformer, GenConfig, dict[str, object]]
) -> None:
    # Dynamic INT8 scales activations per tensor: scored together, histories of other lengths
    # would change each other's lists. A user's answer must be the same in any batch.
    model, cfg, _ = trained
    rec = GenScorer(quantize_int8(model), cfg, precision="int8")
    hist = small_split.histories("test")[:8]
    together = rec.score(hist)
    for row, h in enumerate(hist):
        np.testing.assert_array_equal(together[row], rec.score([h])[0])


@pytest.fixture(scope="session")
def artifact(
    tmp_path_factory: pytest.TempPathFactory,
    small_split: Split,
    trained: tuple[ItemTransformer, GenConfig, dict[str, object]],
) -> Path:
    folder = tmp_path_factory.mktemp("artifact") / "gen"
    model, _, log = trained
    save_artifact(folder, model, small_split, dict(log))
    return folder


def test_artifact_round_trip_serves_catalog_items(small_split: Split, artifact: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["files"]) >= {
        "config.json",
        "model.safetensors",
        "items.json",
        "training.json",
    }
    assert manifest["training_data_sha256"] == small_split.sha256
    for quantize in (False, True):
        rec = load_recommender(artifact, device="cpu", quantize=quantize)
        assert rec.precision == ("int8" if quantize else "fp32")
        history = [small_split.item_ids[i] for i in small_split.histories("test")[0]]
        out = rec.recommend([history, [], ["not-an-item"]], 10)
        catalog = set(small_split.item_ids)
        assert [len(r) for r in out] == [10, 10, 10]
        assert all(item in catalog for r in out for item, _ in r)
        assert not set(history) & {item for item, _ in out[0]}


def test_artifact_with_an_index_serves_the_post_processed_list(
    small_split: Split,
    trained: tuple[ItemTransformer, GenConfig, dict[str, object]],
    artifact: Path,
    tmp_path: Path,
) -> None:
    model, _, log = trained
    rng = np.random.default_rng(0)
    text = rng.normal(size=(small_split.n_items, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    folder = tmp_path / "indexed"
    save_artifact(folder, model, small_split, dict(log), text_embeddings=text)
    config = PostConfig(cosine_floor=0.0, mmr_lambda=0.5, candidates=30)
    served = load_recommender(folder, device="cpu", post=config)
    plain = load_recommender(folder, device="cpu")
    assert served.name == "gen+post"
    hist = small_split.histories("test")[:20]
    histories = [[small_split.item_ids[i] for i in h] for h in hist]
    got = served.recommend(histories, 10)
    steps = CatalogPost(small_split.item_ids, text, config)
    for h, ids, out in zip(hist, histories, got, strict=True):
        assert not set(ids) & {item for item, _ in out}
        expected, _ = steps.top(plain.score([h])[0], np.asarray(h), 10)
        assert [item for item, _ in out] == [small_split.item_ids[i] for i in expected]
    # MMR and the floor change some lists: the steps really run in the served path.
    assert got != plain.recommend(histories, 10)
    with pytest.raises(ArtifactError, match="no item index"):
        load_recommender(artifact, device="cpu", post=config)


def test_tampered_artifacts_are_refused(artifact: Path, tmp_path: Path) -> None:
    weights = copy_artifact(artifact, tmp_path / "weights")
    flip_last_byte(weights / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        load_recommender(weights, device="cpu")

    vocab = copy_artifact(artifact, tmp_path / "vocab")
    items = json.loads((vocab / "items.json").read_text())
    items["item_ids"][0] = "injected"
    (vocab / "items.json").write_text(json.dumps(items))
    with pytest.raises(ArtifactError, match=r"items\.json"):
        load_recommender(vocab, device="cpu")

    extra = copy_artifact(artifact, tmp_path / "extra")
    (extra / "payload.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"payload\.bin"):
        load_recommender(extra, device="cpu")


class _ReverseReranker:
    """Stands in for the language model: prefers the transformer's last candidates."""

    def score_batch(
        self, histories: list[list[object]], candidates: list[list[object]]
    ) -> list[np.ndarray]:
        return [np.arange(len(c), dtype=np.float32) for c in candidates]


def test_fusion_weight_moves_between_the_two_rankings() -> None:
    gen_rank = np.arange(4, dtype=np.float64)
    llm = np.array([0.0, 1.0, 2.0, 3.0])  # the language model reverses the order
    assert list(np.argsort(-fuse(gen_rank, llm, 0.0))) == [0, 1, 2, 3]
    assert list(np.argsort(-fuse(gen_rank, llm, 1.0))) == [3, 2, 1, 0]


def test_gen_rerank_reorders_only_the_candidates_and_stays_in_catalog(
    small_split: Split, trained: tuple[ItemTransformer, GenConfig, dict[str, object]]
) -> None:
    model, cfg, _ = trained
    gen = GenRanker(model, cfg)
    combo = GenRerank(gen, small_split, top_n=5, reranker=_ReverseReranker(), say=lambda _: None)
    combo.weight = 1.0
    hist = small_split.histories("test")[:20]
    gen_top, _ = gen.recommend(hist, 10)
    top, _ = combo.recommend(hist, 10)
    assert (top[:, :5] == gen_top[:, 4::-1]).all()  # head reversed by the stand-in
    assert (top[:, 5:] == gen_top[:, 5:]).all()  # the rest keeps the transformer's order
    assert ((top >= 0) & (top < small_split.n_items)).all()
    for row, h in zip(top, hist, strict=True):
        assert not np.isin(row, h).any()


def test_future_loss_weights_each_next_item() -> None:
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor(
        [
            [[1, 2, -100], [4, 0, 3]],  # next item
            [[2, -100, -100], [0, 3, -100]],  # the one after
        ]
    )
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100)
    flat = logits.reshape(-1, 5)
    one = future_loss(logits, targets[:1], 0.5, ce)
    assert one.item() == pytest.approx(ce(flat, targets[0].reshape(-1)).item(), rel=1e-6)
    two = future_loss(logits, targets, 0.5, ce)
    by_hand = (ce(flat, targets[0].reshape(-1)) + 0.5 * ce(flat, targets[1].reshape(-1))) / 1.5
    assert two.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_future_targets_and_weight_averaging_train(small_split: Split) -> None:
    base: dict[str, Any] = {
        "hidden": 16,
        "layers": 1,
        "heads": 2,
        "ffn": 32,
        "max_len": 20,
        "epochs": 2,
    }
    plain, plain_log = train_gen(small_split, GenConfig(**base), progress=False, say=print)
    # An average that forgets at once is the latest weights: validation sees the same model.
    latest, latest_log = train_gen(
        small_split, GenConfig(**base, ema=1e-12), progress=False, say=print
    )
    assert [h["valid_ndcg@10"] for h in latest_log["history"]] == pytest.approx(
        [h["valid_ndcg@10"] for h in plain_log["history"]], abs=1e-9
    )
    assert torch.allclose(latest.head.weight, plain.head.weight, atol=1e-5)
    slow, _ = train_gen(small_split, GenConfig(**base, ema=0.9), progress=False, say=print)
    assert not torch.allclose(slow.head.weight, plain.head.weight)
    # Windows shorter than the future horizon still train (targets past the end are ignored).
    far, far_log = train_gen(small_split, GenConfig(**base, future=25), progress=False, say=print)
    assert np.isfinite(far_log["history"][-1]["loss"])
    scores = GenScorer(far, far.cfg).score(small_split.histories("test")[:5])
    assert scores.shape == (5, small_split.n_items)


EASE_SETTINGS = {"lam": 100.0, "decay": 0.8, "beta": 0.3, "markov_last": 3}


def test_teacher_targets_come_out_of_fold_and_never_name_an_item_already_there(
    small_split: Split,
) -> None:
    fitted: list[set[int]] = []  # per fit, the users whose training it did not see

    def fit(part: Split) -> EASE:
        fitted.append({u for u, seq in enumerate(part.train) if len(seq) == 0})
        return EASE(**EASE_SETTINGS).fit(part)  # type: ignore[arg-type]

    distill = Distillation(fit, folds=3, top_k=16, context=10)
    taught = teacher_targets(small_split, 30, distill, progress=False)
    windows = training_windows(small_split.train, 30)
    assert len(taught) == len(windows)
    # Each fold's teacher was fitted without exactly that fold's users.
    users = range(len(small_split.train))
    assert fitted == [{u for u in users if u % 3 == f} for f in range(3)]
    for window, (items, probs) in zip(windows, taught, strict=True):
        assert items.shape == probs.shape == (len(window) - 1, 16)
        assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        for j in range(len(window) - 1):
            assert not set(items[j][probs[j] > 0]) & set(window[: j + 1])
    # User 4 (fold 1) is taught what EASE fitted without fold 1 ranks after their first items.
    first = next(n for n, w in enumerate(windows) if set(w) <= set(small_split.train[4]))
    without = [np.zeros(0, np.int64) if u % 3 == 1 else s for u, s in enumerate(small_split.train)]
    ease = EASE(**EASE_SETTINGS).fit(replace(small_split, train=without))  # type: ignore[arg-type]
    window = windows[first]
    scores = ease.score([window[max(0, 5 - 10) : 5]])[0]
    scores[window[:5]] = -np.inf
    assert set(taught[first][0][4]) == set(np.argsort(-scores)[:16])
    # A teacher fitted on everyone has seen the very next items: out of fold it cannot have.
    everyone = EASE(**EASE_SETTINGS).fit(small_split)  # type: ignore[arg-type]
    inside = teacher_targets(
        small_split,
        30,
        Distillation(lambda _: everyone, folds=3, top_k=16, context=10),
        progress=False,
    )

    def next_item_mass(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
        mass = [
            p[j][i[j] == w[j + 1]].sum()
            for w, (i, p) in zip(windows, pairs, strict=True)
            for j in range(len(w) - 1)
        ]
        return float(np.mean(mass))

    assert next_item_mass(inside) > 1.2 * next_item_mass(taught)


def test_distillation_trains_toward_the_teacher(small_split: Split) -> None:
    base: dict[str, Any] = {"hidden": 16, "layers": 1, "heads": 2, "ffn": 32, "max_len": 20}
    plain, _ = train_gen(small_split, GenConfig(**base, epochs=1), progress=False, say=print)
    taught, log = train_gen(
        small_split,
        GenConfig(**base, epochs=1, distill=1.0, distill_folds=2),
        teacher=ease_teacher(EASE_SETTINGS),
        progress=False,
        say=print,
    )
    assert log["teacher_seconds"] > 0
    assert np.isfinite(log["history"][0]["loss"])
    assert not torch.allclose(taught.head.weight, plain.head.weight)
    # Targets built once (as a search does for its trials) train exactly as the teacher does.
    cfg = GenConfig(**base, epochs=1, distill=1.0, distill_folds=2)
    targets = teacher_targets(
        small_split, 20, distillation(cfg, ease_teacher(EASE_SETTINGS)), progress=False
    )
    reused, _ = train_gen(small_split, cfg, taught=targets, progress=False, say=print)
    assert torch.allclose(reused.head.weight, taught.head.weight)
    # Without a teacher given, training tunes EASE on validation and teaches with it.
    _, tuned = train_gen(
        small_split.subset(20), GenConfig(**base, epochs=1, distill=0.5), progress=False, say=print
    )
    assert tuned["teacher_seconds"] > 0
    # The teacher's distribution needs the next-item target over the whole catalog.
    with pytest.raises(ValueError, match="distillation"):
        train_gen(
            small_split,
            GenConfig(**base, epochs=1, distill=0.5, future=2),
            teacher=ease_teacher(EASE_SETTINGS),
            progress=False,
        )


def test_distillation_on_a_catalog_smaller_than_the_teachers_top_k() -> None:
    rng = np.random.default_rng(0)
    n_items, n_users = 20, 30
    split = Split(
        "tiny",
        {},
        [str(i) for i in range(n_items)],
        [str(u) for u in range(n_users)],
        [rng.permutation(n_items)[:8] for _ in range(n_users)],
        rng.integers(0, n_items, n_users),
        rng.integers(0, n_items, n_users),
    )
    cfg = GenConfig(
        hidden=8, layers=1, heads=2, ffn=16, max_len=10, epochs=1, distill=0.5, distill_folds=2
    )
    _, log = train_gen(
        split, cfg, teacher=ease_teacher({**EASE_SETTINGS, "lam": 10.0}), progress=False
    )
    assert np.isfinite(log["history"][0]["loss"])


def test_pca_text_init_spreads_items_along_uncorrelated_directions() -> None:
    text = np.random.default_rng(1).normal(size=(300, 24)) * np.linspace(3, 0.5, 24) + 2.0
    cfg = GenConfig(n_items=300, hidden=8, layers=1, heads=2, ffn=16, text_projection="pca")
    model = ItemTransformer(cfg)
    model.init_from_text(text.astype(np.float32), seed=0)
    table = model.backbone.embed_tokens.weight[1:].detach().numpy().astype(np.float64)
    cov = np.cov(table, rowvar=False)
    off_diagonal = cov - np.diag(np.diag(cov))
    assert np.abs(off_diagonal).max() < 1e-3 * np.diag(cov).max()
    assert np.all(np.diff(np.diag(cov)) <= 1e-9)  # largest-variance direction first
    assert np.abs(table.mean(0)).max() < 1e-4 * np.sqrt(np.diag(cov).max())  # scores, centred
    with pytest.raises(ValueError, match="text_projection"):
        ItemTransformer(GenConfig(n_items=5, hidden=8, text_projection="svd")).init_from_text(
            text[:5].astype(np.float32), seed=0
        )


def test_sampled_loss_is_cross_entropy_over_the_targets_and_drawn_items() -> None:
    torch.manual_seed(0)
    cfg = GenConfig(n_items=50, hidden=16, layers=1, heads=2, ffn=32, max_len=8)
    model = ItemTransformer(cfg).eval()
    hidden = torch.randn(2, 3, 16)
    targets = torch.tensor([[4, 9, -100], [9, 30, 2]])
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    torch.manual_seed(1)
    loss = sampled_loss(model, hidden, targets, 5, loss_fn)
    torch.manual_seed(1)
    drawn = torch.randint(0, 50, (5,))
    cand = torch.unique(torch.cat([torch.tensor([2, 4, 9, 30]), drawn]))
    logits = model.catalog_logits(hidden)[..., cand]  # the catalog's scores, candidates only
    pos = {int(c): i for i, c in enumerate(cand)}
    mapped = torch.tensor([[pos[4], pos[9], -100], [pos[9], pos[30], pos[2]]])
    expected = loss_fn(logits.reshape(-1, len(cand)), mapped.reshape(-1))
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_sampled_softmax_training_beats_popularity(small_split: Split) -> None:
    cfg = GenConfig(
        hidden=32, layers=1, heads=2, ffn=64, max_len=30, batch_size=32, epochs=4, lr=5e-3
    )
    model, log = train_gen(small_split, cfg, negatives=256, progress=False, say=lambda _: None)
    assert log["sampled_negatives"] == 256
    hist = small_split.histories("test")
    gen = _test_ndcg(GenScorer(model, cfg).score(hist), small_split)
    pop = _test_ndcg(PopularityRanker().fit(small_split).score(hist), small_split)
    assert gen > pop, (gen, pop)
