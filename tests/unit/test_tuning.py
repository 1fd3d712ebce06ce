"""The budgeted search: presets as warm starts, the best trial kept, the trace recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference.generative import GenConfig
from lab.baselines import TUNE_USERS, validation_ndcg
from lab.datasets import Dataset, Interaction, Item
from lab.protocol import Split, leave_one_out
from lab.tuning import WARM_STARTS, search_baseline, search_gen


@pytest.fixture(scope="module")
def split() -> Split:
    rng = np.random.default_rng(5)
    rows = []
    for u in range(60):
        item = int(rng.integers(25))
        for step in range(int(rng.integers(4, 10))):
            rows.append(Interaction(f"u{u}", f"i{item}", float(u * 100 + step)))
            item = (item + int(rng.choice([1, 2, 7]))) % 25
    items = {f"i{i}": Item(f"i{i}", f"i{i}") for i in range(25)}
    return leave_one_out(Dataset("walk", rows, items))


def test_search_starts_from_the_presets_and_keeps_the_best_trial(split: Split) -> None:
    model, record = search_baseline(
        "itemknn", split, 5.0, ease_max_items=100, max_trials=6, progress=False, say=lambda _: None
    )
    trials = record["trials"]
    assert [t["params"] for t in trials[:2]] == WARM_STARTS["itemknn"]
    assert len(trials) <= 6
    best = max(t["valid_ndcg@10"] for t in trials)
    assert record["valid_ndcg@10"] == best
    # The returned model is fitted with the best trial's settings.
    assert validation_ndcg(model, split, TUNE_USERS) == best


def test_gen_search_is_skipped_when_an_epoch_outlasts_a_trial(split: Split) -> None:
    cfg = GenConfig(n_items=split.n_items, hidden=16, layers=1, heads=2, ffn=32)
    chosen, record = search_gen(split, cfg, 1e-6, text_embeddings=None, say=lambda _: None)
    assert chosen == {}
    assert "outlast" in record["skipped"]
    assert record["trials"] == []


def test_train_on_a_folder_searches_and_records_the_trace(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from lab.cli import train_cmd
    from tests.unit.test_hybrid_artifact import walks_folder

    data = walks_folder(tmp_path)
    out = tmp_path / "art"
    args = ["--dataset", str(data), "--out", str(out), "--epochs", "1", "--hidden", "16"]
    args += ["--layers", "1", "--max-len", "8", "--no-progress", "--threads", "1"]
    args += ["--tune-budget", "0.05"]  # 3 s: a few trials of each
    result = CliRunner().invoke(train_cmd, args)
    assert result.exit_code == 0, result.output
    log = json.loads((out / "training.json").read_text(encoding="utf-8"))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    search = log["search"]
    assert search["budget_minutes"] == 0.05
    assert search["ease"]["trials"][0]["params"] == WARM_STARTS["ease"][0]
    # The served parts carry the search's best settings, the transformer the chosen ones.
    if config["hybrid"]["fusion"]["itemknn"]:
        assert (
            config["hybrid"]["itemknn"]["k_neighbours"] == search["itemknn"]["best"]["k_neighbours"]
        )
    if search["gen"]["trials"]:
        assert config["gen"]["lr"] == search["gen"]["best"]["lr"]
    # A folder without item text trains without text initialisation and without the index.
    assert config["gen"]["text_init"] is False
    assert not (out / "index").exists()
