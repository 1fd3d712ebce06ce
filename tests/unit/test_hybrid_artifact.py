"""Serving the gen+ease hybrid from an artifact: same scores as in memory, verified, catalog only.

The transformer is untrained (random weights, seeded): these tests check that what the artifact
serves equals what evaluation computes, which does not depend on the weights being any good.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from inference.artifact import load_recommender
from inference.exceptions import ArtifactError
from inference.generative import GenConfig, GenScorer, ItemTransformer
from inference.integrity import signing_key, write_manifest
from inference.scoring import EaseScorer
from inference.settings import ArtifactSigning
from lab.artifact import save_artifact
from lab.baselines import EASE
from lab.datasets import Dataset, Interaction, Item
from lab.hybrid import Hybrid
from lab.protocol import Split, leave_one_out
from lab.trending import DAYS, WEIGHTS
from tests.unit.tamper import copy_artifact, flip_last_byte

N_ITEMS = 20
ALPHA = 0.4


def walks_folder(parent: Path) -> Path:
    """The walks as a generic dataset folder (``interactions.csv``), as a user brings one."""
    data = parent / "walks"
    data.mkdir()
    rows = [f"{it.user_id},{it.item_id},{int(it.ts)}" for it in _interactions()]
    (data / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "\n".join(rows) + "\n")
    return data


def _interactions() -> list[Interaction]:
    # Random walks that mostly step to a neighbouring item: structure for EASE and Markov.
    rng = np.random.default_rng(7)
    rows = []
    for u in range(60):
        item = int(rng.integers(N_ITEMS))
        for step in range(int(rng.integers(4, 12))):
            rows.append(Interaction(f"u{u}", f"i{item}", float(1_600_000_000 + u * 100 + step)))
            item = (item + int(rng.choice([1, 1, 2, 5]))) % N_ITEMS
    return rows


def _split() -> Split:
    items = {f"i{i}": Item(f"i{i}", f"Item {i}") for i in range(N_ITEMS)}
    return leave_one_out(Dataset("walks", _interactions(), items, {"interactions.csv": "0" * 64}))


@pytest.fixture(scope="module")
def split() -> Split:
    return _split()


@pytest.fixture(scope="module")
def parts(split: Split) -> tuple[ItemTransformer, GenConfig, EASE]:
    torch.manual_seed(0)
    cfg = GenConfig(n_items=split.n_items, hidden=16, layers=1, heads=2, ffn=32, max_len=8)
    ease = EASE(lam=10.0, decay=0.9, beta=0.5, markov_last=2).fit(split)
    return ItemTransformer(cfg).eval(), cfg, ease


def _hybrid(parts: tuple[ItemTransformer, GenConfig, EASE], split: Split) -> Hybrid:
    model, cfg, ease = parts
    hybrid = Hybrid(ease, GenScorer(model, cfg)).fit(split)
    hybrid.alpha = ALPHA  # both parts count, whatever validation picked for random weights
    return hybrid


def _save(
    folder: Path,
    parts: tuple[ItemTransformer, GenConfig, EASE],
    split: Split,
    top_k: int | None,
) -> Path:
    hybrid = _hybrid(parts, split) if top_k is not None else None
    save_artifact(
        folder, parts[0], split, {"note": "test"}, hybrid=hybrid, cf_top_k=top_k or N_ITEMS
    )
    return folder


def test_served_hybrid_equals_in_memory_hybrid_without_pruning(
    tmp_path: Path, parts: tuple[ItemTransformer, GenConfig, EASE], split: Split
) -> None:
    folder = _save(tmp_path / "art", parts, split, top_k=N_ITEMS)
    config = json.loads((folder / "config.json").read_text())
    section = config["hybrid"]
    assert config["model"] == "gen+ease"
    assert (section["cf"], section["alpha"], section["top_k"]) == ("ease", ALPHA, N_ITEMS)
    assert section["params"] == {"lam": 10.0, "decay": 0.9, "beta": 0.5, "markov_last": 2}
    assert set(section["valid_ndcg@10"]) == {"gen", "ease", "hybrid"}
    assert "cf.safetensors" in json.loads((folder / "manifest.json").read_text())["files"]

    rec = load_recommender(folder, device="cpu", quantize=False)
    assert rec.name == "gen+ease"
    assert rec.alpha == ALPHA
    hist = split.histories("test")
    expected = _hybrid(parts, split).score(hist)
    np.testing.assert_allclose(rec.score(hist), expected, rtol=0, atol=1e-5)
    # The served lists are the in-memory hybrid's top 10 (as ids), seen items excluded.
    ids = [[split.item_ids[i] for i in h] for h in hist]
    served = rec.recommend(ids, 10)
    for scores, h, out in zip(expected, hist, served, strict=True):
        row = scores.copy()
        row[h] = -np.inf
        best = np.sort(row)[::-1][: len(out)]
        np.testing.assert_allclose([s for _, s in out], best, rtol=0, atol=1e-5)
        assert not {split.item_index[i] for i, _ in out} & set(h.tolist())


def test_pruning_keeps_the_largest_weights_per_item_and_markov_exactly(
    parts: tuple[ItemTransformer, GenConfig, EASE],
) -> None:
    ease = parts[2]
    arrays = ease.to_arrays(top_k=3)
    loaded = EaseScorer.from_arrays(arrays, N_ITEMS, lam=10.0, decay=0.9, beta=0.5, markov_last=2)
    pruned = loaded.weights.toarray()
    dense = ease.weights
    for col in range(N_ITEMS):
        kept = np.flatnonzero(pruned[:, col])
        assert len(kept) <= 3
        np.testing.assert_array_equal(pruned[kept, col], dense[kept, col])
        dropped = np.setdiff1d(np.arange(N_ITEMS), kept)
        assert np.abs(dense[dropped, col]).max() <= np.abs(dense[kept, col]).min()
    np.testing.assert_array_equal(loaded.trans.toarray(), ease.trans.toarray())


def test_pruned_artifact_still_mixes_both_parts(
    tmp_path: Path, parts: tuple[ItemTransformer, GenConfig, EASE], split: Split
) -> None:
    folder = _save(tmp_path / "art", parts, split, top_k=3)
    rec = load_recommender(folder, device="cpu", quantize=False)
    hist = split.histories("test")
    gen = GenScorer(parts[0], parts[1]).score(hist)
    pruned_ease = EaseScorer.from_arrays(
        load_file(str(folder / "cf.safetensors")),
        N_ITEMS,
        lam=10.0,
        decay=0.9,
        beta=0.5,
        markov_last=2,
    )
    np.testing.assert_allclose(
        rec.score(hist),
        Hybrid(pruned_ease, GenScorer(*parts[:2]), ALPHA).score(hist),
        rtol=0,
        atol=1e-5,
    )
    assert not np.allclose(rec.score(hist), gen)


def test_tampered_removed_or_malformed_cf_is_refused(
    tmp_path: Path, parts: tuple[ItemTransformer, GenConfig, EASE], split: Split
) -> None:
    folder = _save(tmp_path / "art", parts, split, top_k=5)

    flipped = copy_artifact(folder, tmp_path / "flipped")
    flip_last_byte(flipped / "cf.safetensors")
    with pytest.raises(ArtifactError, match=r"cf\.safetensors"):
        load_recommender(flipped, device="cpu")

    removed = copy_artifact(folder, tmp_path / "removed")
    (removed / "cf.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"cf\.safetensors"):
        load_recommender(removed, device="cpu")

    # Consistent with its manifest but pointing outside the catalog: the loader's own checks.
    bad = copy_artifact(folder, tmp_path / "bad")
    arrays = load_file(str(bad / "cf.safetensors"))
    arrays["ease.indices"] = arrays["ease.indices"] + N_ITEMS
    save_file(arrays, str(bad / "cf.safetensors"))
    # Re-signed with the session's key: an insider with the key, caught by the loader itself.
    write_manifest(bad, {"version": "tampered"}, signing_key(ArtifactSigning()))
    with pytest.raises(ArtifactError, match=r"cf\.safetensors"):
        load_recommender(bad, device="cpu")


def test_gen_alone_without_the_section_or_when_asked(
    tmp_path: Path, parts: tuple[ItemTransformer, GenConfig, EASE], split: Split
) -> None:
    hist = split.histories("test")
    gen = GenScorer(parts[0], parts[1]).score(hist)
    plain = _save(tmp_path / "plain", parts, split, top_k=None)
    assert "hybrid" not in json.loads((plain / "config.json").read_text())
    assert not (plain / "cf.safetensors").exists()
    with_hybrid = _save(tmp_path / "hybrid", parts, split, top_k=N_ITEMS)
    for rec in (
        load_recommender(plain, device="cpu", quantize=False),
        load_recommender(with_hybrid, device="cpu", quantize=False, hybrid=False),
    ):
        assert rec.name == "gen"
        assert rec.cf is None
        np.testing.assert_allclose(rec.score(hist), gen, rtol=0, atol=1e-6)


def test_hybrid_serves_only_unseen_catalog_items(
    tmp_path: Path, parts: tuple[ItemTransformer, GenConfig, EASE], split: Split
) -> None:
    folder = _save(tmp_path / "art", parts, split, top_k=4)
    catalog = set(split.item_ids)
    for quantize in (False, True):
        rec = load_recommender(folder, device="cpu", quantize=quantize)
        assert rec.name == "gen+ease"
        long = split.item_ids[: N_ITEMS - 3]
        out = rec.recommend([long, ["i1", "i2"], [], ["not-an-item"]], N_ITEMS)
        # Only 3 unseen items are left for the long history; unknown ids fall back to popularity.
        assert [len(r) for r in out] == [3, N_ITEMS - 2, N_ITEMS, N_ITEMS]
        assert all(item in catalog for r in out for item, _ in r)
        assert not set(long) & {item for item, _ in out[0]}
        assert not {"i1", "i2"} & {item for item, _ in out[1]}


@pytest.mark.parametrize("hybrid", [True, False])
def test_train_command_writes_the_hybrid_unless_told_not_to(tmp_path: Path, hybrid: bool) -> None:
    from click.testing import CliRunner

    from lab.cli import train_cmd

    data = walks_folder(tmp_path)
    out = tmp_path / "art"
    args = ["--dataset", str(data), "--out", str(out), "--epochs", "1", "--hidden", "16"]
    args += ["--layers", "1", "--max-len", "8", "--no-index", "--no-progress", "--threads", "1"]
    args += ["--tune-budget", "0"]  # a folder has no preset: the search (tested apart) is on
    args += ["--hybrid", "--cf-top-k", "5"] if hybrid else ["--no-hybrid"]
    result = CliRunner().invoke(train_cmd, args)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    rec = load_recommender(out, device="cpu")
    if hybrid:
        # The served fusion: weights chosen on validation, at least the best single model there.
        weights = config["hybrid"]["fusion"]
        assert all(0.0 <= w <= 1.0 for w in weights.values())
        assert sum(weights.values()) == pytest.approx(1.0)
        valid = config["hybrid"]["valid_ndcg@10"]
        assert valid["fused"] >= max(valid[n] for n in ("gen", "ease", "itemknn", "pop"))
        assert rec.name == config["model"]
        assert rec.name == "+".join(n for n in ("gen", "ease", "itemknn", "pop") if weights[n])
        if weights["ease"]:
            assert config["hybrid"]["top_k"] == 5
            assert rec.cf is not None
            assert np.diff(rec.cf.weights.tocsc().indptr).max() <= 5
        # Recent popularity for 1-3 items, chosen on held-out users (weight 0: none helped).
        trending = config["trending"]
        assert trending["below"] == 4 and trending["weight"] in (0.0, *WEIGHTS)
        assert trending["days"] in (0, *(round(d) for d in DAYS))
        assert (rec.trending.days, rec.trending.weight) == (trending["days"], trending["weight"])
        assert "recent popularity:" in result.output
        # It was judged with the served fusion as well: its transformer trained again without
        # a fold's users, no longer than the first training.
        # (Here a one-epoch transformer is not served, so it is not trained again.)
        judge = json.loads((out / "training.json").read_text())["trending_judge"]
        assert judge["trained"] is (weights["gen"] > 0) is False
        assert judge["max_epochs"] == 1
        assert ("training the transformer again" in result.output) is judge["trained"]
    else:
        assert "hybrid" not in config and "trending" not in config
        assert rec.name == "gen"


def test_the_judge_trains_the_transformer_again_without_the_held_out_users(
    split: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served model's stand-in for recent popularity's held-out users: trained as the
    served transformer was, on the other users only, none of the held-out ones validating it."""
    from dataclasses import replace

    from inference.generative import GenConfig, GenScorer
    from lab import training
    from lab.cli import _Judge

    seen: list[Split] = []
    real = training.train_gen

    def spy(part: Split, cfg: GenConfig, **kwargs: object) -> object:
        seen.append(part)
        return real(part, cfg, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "train_gen", spy)
    cfg = GenConfig(hidden=16, layers=1, heads=2, ffn=32, max_len=8, epochs=50, patience=50)
    judge = _Judge(cfg, None, negatives=0, teacher=None, epochs=2, seconds=60.0, progress=False)
    empty = np.zeros(0, dtype=np.int64)
    part = replace(split, train=[empty if u % 5 == 0 else s for u, s in enumerate(split.train)])
    scorer = judge(part)
    assert isinstance(scorer, GenScorer) and scorer.model.cfg.n_items == split.n_items
    (trained,) = seen
    held = np.arange(len(split.train)) % 5 == 0
    assert (trained.valid_target[held] == -1).all() and (trained.test_target[held] == -1).all()
    assert np.array_equal(trained.valid_target[~held], split.valid_target[~held])
    assert judge.record["trained"] and judge.record["users_held_out"] == held.sum()
    assert judge.record["epochs_run"] == 2  # the served transformer's epochs, not its config's
    assert cfg.epochs == 50  # the served settings are not changed


def test_each_file_is_opened_once_and_loaded_from_the_verified_bytes(
    tmp_path: Path,
    parts: tuple[ItemTransformer, GenConfig, EASE],
    split: Split,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import builtins
    import io
    import os

    from inference import integrity
    from inference.postprocess import PostConfig

    rng = np.random.default_rng(1)
    text = rng.normal(size=(split.n_items, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    folder = tmp_path / "art"
    hybrid = _hybrid(parts, split)
    save_artifact(folder, parts[0], split, {"n": 1}, text_embeddings=text, hybrid=hybrid)
    post = PostConfig(cosine_floor=0.0, mmr_lambda=0.5, candidates=10)
    hist = split.histories("test")
    clean = load_recommender(folder, device="cpu", quantize=False, post=post)

    # Other weights of the same shape, which the attacker swaps in once the check has read
    # the file: a loader that reopened the path would serve them.
    torch.manual_seed(99)
    other = tmp_path / "other"
    save_artifact(other, ItemTransformer(parts[1]).eval(), split, {"n": 2}, hybrid=hybrid)
    swapped = (other / "model.safetensors").read_bytes()
    opened: list[str] = []
    read_once = integrity._read_once
    real_os_open, real_open = os.open, builtins.open

    def swap_after_read(path: Path, root: Path) -> bytes:
        data = read_once(path, root)
        if path.name == "model.safetensors":
            with real_open(path, "wb") as fh:  # the attacker's write, not counted
                fh.write(swapped)
        return data

    def os_open(path: object, *args: object, **kwargs: object) -> int:
        opened.append(str(path))
        return real_os_open(path, *args, **kwargs)  # type: ignore[arg-type]  # passthrough

    def open_(path: object, *args: object, **kwargs: object) -> object:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]  # passthrough

    monkeypatch.setattr(integrity, "_read_once", swap_after_read)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # pathlib's read_bytes opens through io.open
    served = load_recommender(folder, device="cpu", quantize=False, post=post)
    monkeypatch.undo()

    inside = [p for p in opened if Path(p).is_relative_to(folder)]
    files = json.loads((folder / "manifest.json").read_text())["files"]
    expected = sorted(str(folder / rel) for rel in [*files, "manifest.json", "manifest.sig"])
    assert sorted(inside) == expected  # every file exactly once, nothing reopened
    assert (folder / "model.safetensors").read_bytes() == swapped  # the swap did happen
    np.testing.assert_array_equal(served.score(hist), clean.score(hist))
    assert served.recommend([[]], 5) == clean.recommend([[]], 5)
    # And the next load sees the swapped file and refuses it.
    with pytest.raises(ArtifactError, match=r"model\.safetensors fails its integrity check"):
        load_recommender(folder, device="cpu")
