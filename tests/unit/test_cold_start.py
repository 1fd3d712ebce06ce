"""Cold start: the prefix protocol, retrieval's blend, recent popularity's, and an artifact that
serves them.

The transformer is untrained (random weights, seeded) and the item vectors are random: these
tests check what is cut, what is scored and what is served, not how good the lists are.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inference.artifact import load_recommender
from inference.exceptions import ArtifactError, InferenceError
from inference.generative import GenConfig, GenScorer, ItemTransformer
from inference.hybrid import blend, standardise
from inference.index import ItemIndex
from inference.retrieval import RetrievalBlend, RetrievalConfig, TextRetrieval
from inference.scoring import top_k_unseen
from inference.trending import TrendingConfig
from lab.artifact import save_artifact
from lab.baselines import EASE
from lab.datasets import Dataset, Interaction, Item
from lab.evaluate import RETRIEVED, cold_start, cold_start_table, run_eval
from lab.hybrid import Hybrid, fit_retrieval
from lab.protocol import Split, leave_one_out
from schemas.messages import POPULAR_MIN_USERS
from tests.unit.tamper import copy_artifact, resealed

N_ITEMS = 24
DIM = 8


def _split() -> Split:
    rng = np.random.default_rng(3)
    rows = []
    for u in range(50):
        item = int(rng.integers(N_ITEMS))
        for step in range(int(rng.integers(3, 10))):
            rows.append(Interaction(f"u{u}", f"i{item}", float(1_600_000_000 + u * 100 + step)))
            item = (item + int(rng.choice([1, 2, 3, 7]))) % N_ITEMS
    items = {f"i{i}": Item(f"i{i}", f"Item {i}") for i in range(N_ITEMS)}
    return leave_one_out(Dataset("walks", rows, items, {"interactions.csv": "0" * 64}))


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    unit: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit


@pytest.fixture(scope="module")
def split() -> Split:
    return _split()


@pytest.fixture(scope="module")
def gen(split: Split) -> tuple[ItemTransformer, GenScorer]:
    torch.manual_seed(0)
    cfg = GenConfig(n_items=split.n_items, hidden=16, layers=1, heads=2, ffn=32, max_len=8)
    model = ItemTransformer(cfg).eval()
    return model, GenScorer(model, cfg)


@pytest.fixture(scope="module")
def hybrid(split: Split, gen: tuple[ItemTransformer, GenScorer]) -> Hybrid:
    ease = EASE(lam=10.0, decay=0.9, beta=0.5, markov_last=2).fit(split)
    mixed = Hybrid(ease, gen[1]).fit(split)
    mixed.alpha = 0.4
    return mixed


@pytest.fixture(scope="module")
def text(split: Split) -> TextRetrieval:
    return TextRetrieval(ItemIndex.build(split.item_ids, _vectors(split.n_items)), split.item_ids)


# The protocol ----------------------------------------------------------------------------------


def test_prefixes_are_the_first_training_items_and_never_hold_a_target() -> None:
    # Each user sees distinct items in a known time order (user u: i(u), i(u+1), ...), read
    # from a shuffled file, so the prefix must come from the timestamps.
    rows = [
        Interaction(f"u{u}", f"i{(u + s) % N_ITEMS}", float(1_000 * u + s))
        for u in range(12)
        for s in range(2 + u % 6)
    ]
    rows = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    rows.sort(key=lambda it: it.ts)
    items = {f"i{i}": Item(f"i{i}", f"Item {i}") for i in range(N_ITEMS)}
    split = leave_one_out(Dataset("ordered", rows, items, {"interactions.csv": "0" * 64}))
    for stage in ("valid", "test"):
        targets = split.targets(stage)
        for n in (1, 2, 3):
            hist, users = split.prefix_histories(stage, n)
            expected = [u for u in range(12) if (2 + u % 6) - 2 >= n]  # training items >= n
            assert [split.user_ids[split.eval_users[r]] for r in users] == [
                f"u{u}" for u in expected
            ]
            for h, r, u in zip(hist, users, expected, strict=True):
                assert [split.item_ids[i] for i in h] == [f"i{(u + s) % N_ITEMS}" for s in range(n)]
                # The validation and the test item come after every training item.
                assert targets[r] not in h.tolist()
                assert split.valid_target[split.eval_users[r]] not in h.tolist()
                assert split.test_target[split.eval_users[r]] not in h.tolist()
    with pytest.raises(ValueError, match="at least one"):
        split.prefix_histories("test", 0)


def test_cold_start_ranks_each_prefix_on_the_same_targets(split: Split, hybrid: Hybrid) -> None:
    rows, per_user = cold_start({"gen+ease": hybrid}, split, (1, 2))
    assert list(rows) == ["1", "2", "full"]
    for label, n in (("1", 1), ("2", 2)):
        hist, users = split.prefix_histories("test", n)
        assert rows[label]["gen+ease"]["users"] == len(hist)
        scores = hybrid.score(hist)
        target = split.targets("test")[users]
        # The per-user NDCG comes from the prefix's scores and the full protocol's target.
        masked = scores.copy()
        for row, h in enumerate(hist):
            masked[row, h] = -np.inf
        tops = np.argsort(-masked, axis=1, kind="stable")[:, :10]
        hits = [int(t) in top for top, t in zip(tops, target, strict=True)]
        assert np.count_nonzero(per_user[label]["gen+ease"]) == sum(hits)
    assert rows["full"]["gen+ease"]["users"] == len(split.eval_users)


def test_run_eval_reports_cold_start_with_and_without_retrieval(
    split: Split, gen: tuple[ItemTransformer, GenScorer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lab import evaluate

    scorer = gen[1]
    monkeypatch.setattr(evaluate, "_gen_models", lambda *a, **k: iter([(0, scorer, scorer)]))
    monkeypatch.setattr(evaluate, "_item_vectors", lambda s, a: _vectors(s.n_items))
    report = run_eval(
        split,
        ["ease", "gen+ease"],
        cold_start_prefixes=(1, 2, 3),
        retrieval=RetrievalConfig(weight=0.5, max_history=2),
        say=lambda _: None,
    )
    section = report["_cold_start"]
    assert section["retrieval"][0]["weight"] == 0.5
    assert list(section["rows"]) == ["1", "2", "3", "full"]
    for label in ("2", "3"):  # not below the threshold: the same lists
        row = section["rows"][label]
        assert row[RETRIEVED]["ndcg@10"] == row["gen+ease"]["ndcg@10"]
        assert row["retrieval_vs_gen+ease"]["wilcoxon_p"] == 1.0
    assert "wilcoxon_p" in section["rows"]["1"]["retrieval_vs_gen+ease"]
    assert "full" in cold_start_table(section)
    json.dumps(report)  # the report is written as JSON


# Retrieval -------------------------------------------------------------------------------------


def test_retrieval_scores_only_catalog_items_and_ranks_seen_ones_last(split: Split) -> None:
    # The index also holds items outside the catalog; they are never scored.
    extra = [f"x{i}" for i in range(5)]
    vectors = _vectors(split.n_items + 5, seed=1)
    index = ItemIndex.build([*split.item_ids, *extra], vectors)
    found = TextRetrieval(index, split.item_ids)
    hist = [np.asarray([0, 3]), np.asarray([5])]
    scores = found.score(hist)
    assert scores.shape == (2, split.n_items)
    query = vectors[[0, 3]].mean(axis=0)
    query /= np.linalg.norm(query)
    unseen = np.setdiff1d(np.arange(split.n_items), [0, 3])
    np.testing.assert_allclose(scores[0, unseen], vectors[unseen] @ query, atol=1e-5)
    assert scores[0, [0, 3]].max() <= scores[0].min() + 1e-7
    with pytest.raises(InferenceError, match="lacks"):
        short = ItemIndex.build(split.item_ids[:-1], vectors[: split.n_items - 1])
        TextRetrieval(short, split.item_ids)


def test_extra_query_vectors_move_the_query(text: TextRetrieval) -> None:
    hist = [np.asarray([1]), np.asarray([1])]
    session = _vectors(1, seed=9)[0]
    q = text.queries(hist, [None, session])
    np.testing.assert_allclose(q[0], text.queries([np.asarray([1])])[0])
    both = text.index.vectors([text.item_ids[1]])[0] + session
    np.testing.assert_allclose(q[1], both / np.linalg.norm(both), atol=1e-6)


def test_blend_is_used_only_below_the_threshold(
    split: Split, hybrid: Hybrid, text: TextRetrieval
) -> None:
    config = RetrievalConfig(weight=0.5, max_history=3)
    blended = RetrievalBlend(hybrid, text, config)
    hist = [np.asarray([2]), np.asarray([2, 4]), np.asarray([2, 4, 6]), np.asarray([1, 2, 3, 4])]
    base, scores = hybrid.score(hist), blended.score(hist)
    np.testing.assert_array_equal(scores[2:], base[2:])
    expected = blend(base[:2], text.score(hist[:2]), 0.5)
    np.testing.assert_allclose(scores[:2], expected, atol=1e-6)
    assert not np.allclose(scores[0], base[0])
    # Seen items are still filtered out and only catalog positions come back.
    top, _ = top_k_unseen(scores.copy(), hist, 10)
    for row, h in zip(top, hist, strict=True):
        assert not set(row.tolist()) & set(h.tolist())
        assert ((row >= 0) & (row < split.n_items)).all()
    off = RetrievalBlend(hybrid, text, RetrievalConfig(weight=0.0, max_history=3))
    np.testing.assert_array_equal(off.score(hist), base)


def test_config_is_checked() -> None:
    with pytest.raises(InferenceError):
        RetrievalConfig(weight=-1.0, max_history=2)
    with pytest.raises(InferenceError):
        RetrievalConfig(weight=1.0, max_history=-2)
    assert not RetrievalConfig(weight=1.0, max_history=2).applies(0)  # empty: popularity
    assert RetrievalConfig(weight=1.0, max_history=2).applies(1)
    assert not RetrievalConfig(weight=1.0, max_history=2).applies(2)
    with pytest.raises(ArtifactError):
        RetrievalConfig.from_json({"weight": "x", "max_history": 2})
    with pytest.raises(ArtifactError):
        RetrievalConfig.from_json({"source": "audio", "weight": 1, "max_history": 2})


def test_fit_retrieval_picks_on_validation_and_leaves_full_histories_alone(
    split: Split, hybrid: Hybrid
) -> None:
    # Vectors that point each item at its validation successors make retrieval helpful;
    # random ones are fitted too, and either way the threshold stays below full histories.
    chosen = fit_retrieval(hybrid, _text_towards_targets(split), split, prefixes=(1, 2))
    assert chosen.weight > 0 and chosen.max_history in (2, 3)
    grid = {f"prefix{n}_w{w}" for n in (1, 2) for w in (0.0, 0.1, 0.25, 0.5, 1.0)}
    assert set(chosen.valid_ndcg or {}) == grid
    useless = fit_retrieval(hybrid, _text_towards_targets(split, noise=True), split)
    assert useless.max_history <= 6


def _text_towards_targets(split: Split, noise: bool = False) -> TextRetrieval:
    vectors = _vectors(split.n_items, seed=5)
    if not noise:
        # Each validation user's first item looks like their validation target.
        for u in split.eval_users:
            vectors[split.train[u][0]] = vectors[split.valid_target[u]]
    return TextRetrieval(ItemIndex.build(split.item_ids, vectors), split.item_ids)


# The artifact ----------------------------------------------------------------------------------


def test_artifact_serves_the_stored_retrieval(
    tmp_path: Path, split: Split, gen: tuple[ItemTransformer, GenScorer], hybrid: Hybrid
) -> None:
    vectors = _vectors(split.n_items)
    model = gen[0]
    config = RetrievalConfig(weight=0.5, max_history=3)
    folder = tmp_path / "art"
    save_artifact(
        folder,
        model,
        split,
        {"note": "test"},
        text_embeddings=vectors,
        hybrid=hybrid,
        cf_top_k=N_ITEMS,
        retrieval=config,
    )
    stored = json.loads((folder / "config.json").read_text())["retrieval"]
    assert stored == {"source": "text", "weight": 0.5, "max_history": 3}
    rec = load_recommender(folder, device="cpu", quantize=False)
    assert rec.retrieval == config and rec.name == "gen+ease"
    text = TextRetrieval(ItemIndex.build(split.item_ids, vectors), split.item_ids)
    hist = [np.asarray([2]), np.asarray([2, 4]), np.asarray([2, 4, 6, 8])]
    expected = RetrievalBlend(hybrid, text, config).score(hist)
    np.testing.assert_allclose(rec.score(hist), expected, atol=1e-4)
    np.testing.assert_allclose(rec.score(hist)[2], hybrid.score(hist)[2], atol=1e-5)
    served = rec.recommend([[split.item_ids[i] for i in h] for h in hist], 10)
    for h, out in zip(hist, served, strict=True):
        assert len(out) == 10
        assert not {split.item_index[i] for i, _ in out} & set(h.tolist())
        assert all(i in split.item_index for i, _ in out)
    plain = load_recommender(folder, device="cpu", quantize=False, retrieval=False)
    assert not plain.retrieval.active
    np.testing.assert_allclose(plain.score(hist), hybrid.score(hist), atol=1e-5)


def test_retrieval_needs_the_index_and_a_sane_section(
    tmp_path: Path, split: Split, gen: tuple[ItemTransformer, GenScorer], hybrid: Hybrid
) -> None:
    model = gen[0]
    with pytest.raises(ArtifactError, match="item index"):
        save_artifact(
            tmp_path / "no-index",
            model,
            split,
            {},
            hybrid=hybrid,
            retrieval=RetrievalConfig(weight=0.5, max_history=3),
        )
    folder = tmp_path / "art"
    save_artifact(
        folder,
        model,
        split,
        {},
        text_embeddings=_vectors(split.n_items),
        hybrid=hybrid,
        retrieval=RetrievalConfig(weight=0.5, max_history=3),
    )
    # A changed section is refused by the manifest like any other change.
    changed = copy_artifact(folder, tmp_path / "changed")
    config = json.loads((changed / "config.json").read_text())
    config["retrieval"]["weight"] = 5.0
    (changed / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError):
        load_recommender(changed, device="cpu", quantize=False)


# Recent popularity, served ---------------------------------------------------------------------


def test_artifact_blends_the_recent_counts_it_is_given_into_short_histories_only(
    tmp_path: Path, split: Split, gen: tuple[ItemTransformer, GenScorer], hybrid: Hybrid
) -> None:
    config = TrendingConfig(days=30, weight=4.0, below=3, gain=0.5)
    vectors = _vectors(split.n_items)
    retrieval = RetrievalConfig(weight=0.5, max_history=4)
    folder = tmp_path / "art"
    save_artifact(
        folder,
        gen[0],
        split,
        {},
        text_embeddings=vectors,
        hybrid=hybrid,
        cf_top_k=N_ITEMS,
        retrieval=retrieval,
        trending=config,
    )
    stored = json.loads((folder / "config.json").read_text())["trending"]
    assert stored == {
        "days": 30,
        "weight": 4.0,
        "below": 3,
        "scale": "top",
        "idle_s": 0,
        "heldout_gain": 0.5,
    }
    rec = load_recommender(folder, device="cpu", quantize=False)
    assert rec.trending == config and rec.recent_days == 30  # the record read back too
    hist = [np.asarray([2]), np.asarray([2, 4]), np.asarray([2, 4, 6]), np.asarray([2, 4, 6, 8])]
    text = TextRetrieval(ItemIndex.build(split.item_ids, vectors), split.item_ids)
    retrieved = RetrievalBlend(hybrid, text, retrieval).score(hist)
    # No counts yet: retrieval's blend for histories under 4 items, as without the section.
    np.testing.assert_allclose(rec.score(hist), retrieved, atol=1e-4)
    counts = {"i5": 40, "i9": 3, "not-in-the-catalog": 1000, "i11": -4, "i12": float("nan")}
    counts |= {"i13": 10**400, "i14": "7", "i15": True}  # none a count: ignored
    rec.use_recent(counts)
    recent = np.zeros(split.n_items, dtype=np.float32)
    recent[split.item_index["i5"]] = np.log1p(40)
    recent[split.item_index["i9"]] = np.log1p(3)
    served = rec.score(hist)
    # Under 3 items: the measured blend of the model and recent popularity, in place of
    # retrieval's; 3 items: retrieval's; 4: the model's own. The most taken-up item is lifted
    # by the weight, in standard deviations of the model's scores; the others by their share of
    # its log(1 + count).
    expected = standardise(hybrid.score(hist[:2])) + 4.0 * recent / np.log1p(40)
    np.testing.assert_allclose(served[:2], expected, atol=1e-4)
    np.testing.assert_allclose(served[2], retrieved[2], atol=1e-4)
    np.testing.assert_allclose(served[3], hybrid.score(hist)[3], atol=1e-5)
    lists = rec.recommend([["i2"], ["i5"]], 3)
    assert lists[0][0][0] == "i5"  # what is popular now heads a one-item history's list
    assert "i5" not in {item for item, _ in lists[1]}  # and is never a seen item
    rec.use_recent(None)
    np.testing.assert_allclose(rec.score(hist), retrieved, atol=1e-4)


def test_an_artifact_trained_before_the_top_scale_serves_the_blend_it_was_chosen_with(
    tmp_path: Path, split: Split, gen: tuple[ItemTransformer, GenScorer], hybrid: Hybrid
) -> None:
    """A ``"trending"`` section without ``"scale"`` was chosen with the counts standardised over
    the catalog: it keeps that blend (its weight means nothing on the other scale)."""
    folder = tmp_path / "art"
    config = TrendingConfig(days=7, weight=2.0, below=3)
    save_artifact(folder, gen[0], split, {}, hybrid=hybrid, cf_top_k=N_ITEMS, trending=config)
    sections = json.loads((folder / "config.json").read_text())
    del sections["trending"]["scale"]
    legacy = resealed(folder, tmp_path / "legacy", sections)
    rec = load_recommender(legacy, device="cpu", quantize=False)
    assert rec.trending == TrendingConfig(days=7, weight=2.0, below=3, scale="z")
    rec.use_recent({"i5": 40, "i9": 3})
    recent = np.zeros(split.n_items)
    recent[split.item_index["i5"]], recent[split.item_index["i9"]] = np.log1p(40), np.log1p(3)
    hist = [np.asarray([2])]
    expected = standardise(hybrid.score(hist)) + 2.0 * standardise(recent[None, :])
    np.testing.assert_allclose(rec.score(hist), expected, atol=1e-4)
    # A scale it does not know is refused, not served some other way.
    sections["trending"]["scale"] = "log"
    with pytest.raises(ArtifactError, match="scale"):
        load_recommender(resealed(folder, tmp_path / "odd", sections), device="cpu")


def test_a_blend_for_returning_users_reaches_only_the_lists_made_again_for_them(
    tmp_path: Path, split: Split, gen: tuple[ItemTransformer, GenScorer], hybrid: Hybrid
) -> None:
    """With ``idle_s`` the lists made as events are folded are the model's alone; a list made
    again for a user who has been away (``returning``) gets the blend, and says which items it
    brought in."""
    from inference.reasons import explain_lists

    folder = tmp_path / "art"
    config = TrendingConfig(days=7, weight=8.0, below=3, idle_s=3600)
    save_artifact(folder, gen[0], split, {}, hybrid=hybrid, cf_top_k=N_ITEMS, trending=config)
    rec = load_recommender(folder, device="cpu", quantize=False)
    assert rec.trending == config and rec.refreshes and rec.recent_days == 7
    own = [item for item, _ in rec.recommend([["i2"]], N_ITEMS)[0]]
    rec.use_recent({item: 5 + 10 * n for n, item in enumerate(own)})  # the model's last most
    hist = [np.asarray([2]), np.asarray([2]), np.asarray([2, 4, 6])]
    served = rec.score(hist, returning=[False, True, True])
    plain = hybrid.score(hist)
    np.testing.assert_allclose(served[0], plain[0], atol=1e-5)  # as folded: the model alone
    np.testing.assert_allclose(served[2], plain[2], atol=1e-5)  # too long for the blend
    assert not np.allclose(standardise(plain[1:2])[0], served[1], atol=1e-3)
    np.testing.assert_allclose(rec.score(hist[:1]), plain[:1], atol=1e-5)  # no flags: folded
    folded, back = rec.recommend([["i2"], ["i2"]], 10, returning=[False, True])
    assert [i for i, _ in folded] == own[:10] and [i for i, _ in back] != own[:10]
    listed = [i for i, _ in back]
    assert rec.popular(["i2"], listed) == {}  # as folded, nothing was brought in
    brought = rec.popular(["i2"], listed, returning=True)
    assert brought and set(brought) <= set(listed) - set(own[:10])
    reasons = explain_lists(rec, [["i2"], ["i2"]], [folded, back], [False, True])
    assert reasons is not None
    assert reasons[0].popular == {} and reasons[1].popular == brought


def test_eval_takes_each_artifacts_own_blend_and_chooses_only_without_one(
    tmp_path: Path, split: Split, gen: tuple[ItemTransformer, GenScorer], hybrid: Hybrid
) -> None:
    """`recstream eval --cold-start --artifact ...` judges the blend each artifact serves (what
    its training chose, both guards included), not one chosen again by the lab."""
    from lab.evaluate import _artifact_blends

    guarded = TrendingConfig(30, 2.0, 4, gain=0.09, next_gain=0.04, served_next_gain=0.01)
    configs = [guarded, TrendingConfig(days=7, weight=1.0, below=4, gain=0.06), None]
    folders = []
    for n, config in enumerate(configs):
        folders.append(tmp_path / f"art{n}")
        save_artifact(
            folders[-1], gen[0], split, {}, hybrid=hybrid, cf_top_k=N_ITEMS, trending=config
        )
    blends = _artifact_blends(folders[:2])
    assert blends is not None
    assert [(c.days, c.weight, c.gain, c.next_gains, below) for c, below in blends] == [
        (30.0, 2.0, 0.09, (0.04, 0.01), 4),
        (7.0, 1.0, 0.06, (), 4),
    ]
    # An artifact without the section (or none at all): the lab chooses, for every seed alike.
    assert _artifact_blends(folders) is None and _artifact_blends([]) is None


def test_popular_names_the_items_recent_popularity_brought_into_the_list(
    tmp_path: Path, split: Split, gen: tuple[ItemTransformer, GenScorer], hybrid: Hybrid
) -> None:
    folder = tmp_path / "art"
    config = TrendingConfig(days=7, weight=8.0, below=3)
    save_artifact(folder, gen[0], split, {}, hybrid=hybrid, cf_top_k=N_ITEMS, trending=config)
    rec = load_recommender(folder, device="cpu", quantize=False)
    history = ["i2"]
    own = [item for item, _ in rec.recommend([history], N_ITEMS)[0]]  # the model's order
    assert rec.popular(history, own) == {}  # no counts yet
    # The model's favourite is counted least and its last most; one item under the minimum
    # (listed or not, it is never said to be popular).
    counts = {item: 5 + 10 * n for n, item in enumerate(own)}
    counts[own[-2]] = POPULAR_MIN_USERS - 1
    rec.use_recent(counts)
    listed = [item for item, _ in rec.recommend([history], 10)[0]]
    named = rec.popular(history, listed)
    # Popular: what the counts brought into the ten, of what enough users took up.
    brought = set(listed) - set(own[:10])
    assert named == {item: counts[item] for item in brought if counts[item] >= POPULAR_MIN_USERS}
    assert len(named) >= 3 and own[0] not in named
    assert rec.recent_users([own[-2], own[-1], "not-in-the-catalog"]) == {own[-1]: counts[own[-1]]}
    assert rec.popular(["i2", "i4", "i6"], listed) == {}  # too long for the blend
    # The blend's model scores, kept for popular(), are given back for that history only,
    # whatever array holds it: int32 [2, 0] has the bytes of int64 [2].
    plain = load_recommender(folder, device="cpu", quantize=False)
    (at,) = rec.to_indices(history).tolist()
    rec.score([np.asarray([at])])
    for h in (np.asarray([at]), np.asarray([at], np.int32), np.asarray([at, 0], np.int32)):
        np.testing.assert_allclose(rec.model_score([h]), plain.model_score([h]), atol=1e-5)
    rec.use_recent(None)
    assert rec.popular(history, listed) == {}


def test_an_artifact_without_the_blend_ignores_counts_and_a_bad_section_is_refused(
    tmp_path: Path, split: Split, gen: tuple[ItemTransformer, GenScorer], hybrid: Hybrid
) -> None:
    folder = tmp_path / "plain"
    save_artifact(folder, gen[0], split, {}, hybrid=hybrid, cf_top_k=N_ITEMS)
    rec = load_recommender(folder, device="cpu", quantize=False)
    assert rec.recent_days == 0 and not rec.trending.active
    rec.use_recent({"i5": 40})
    hist = [np.asarray([2])]
    np.testing.assert_allclose(rec.score(hist), hybrid.score(hist), atol=1e-5)
    for section in (
        {"days": 30.5, "weight": 1.0, "below": 4},
        {"days": "30", "weight": 1.0, "below": 4},
        {"days": 30, "weight": -1.0, "below": 4},
        {"days": 30, "weight": float("inf"), "below": 4},
        {"days": 0, "weight": 1.0, "below": 4},
        {"days": 400, "weight": 1.0, "below": 4},
        {"weight": 1.0, "below": 4},
        [30, 1.0, 4],
    ):
        with pytest.raises(ArtifactError, match="trending"):
            TrendingConfig.from_json(section)
