"""The budgeted search: presets as warm starts, the best trial kept, the trace recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from inference.generative import GenConfig
from lab.baselines import TUNE_USERS, validation_ndcg
from lab.datasets import Dataset, Interaction, Item
from lab.protocol import Split, leave_one_out
from lab.tuning import SEARCH_ALPHA, WARM_STARTS, choose_trial, search_baseline, search_gen


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


def test_search_starts_from_the_presets_and_keeps_the_chosen_trial(split: Split) -> None:
    model, record = search_baseline(
        "itemknn", split, 5.0, ease_max_items=100, max_trials=6, progress=False, say=lambda _: None
    )
    trials = record["trials"]
    assert [t["params"] for t in trials[:2]] == WARM_STARTS["itemknn"]
    assert len(trials) <= 6
    best = max(t["valid_ndcg@10"] for t in trials)
    warm_best = max(t["valid_ndcg@10"] for t in trials[:2])
    if record["chosen_by"] == "search":
        assert record["valid_ndcg@10"] == best > warm_best
        assert record["search_vs_warm_start"]["wilcoxon_p"] < SEARCH_ALPHA
    else:
        assert record["valid_ndcg@10"] == warm_best
        assert record["best"] in WARM_STARTS["itemknn"]
    # The returned model is fitted with the chosen trial's settings.
    assert validation_ndcg(model, split, TUNE_USERS) == record["valid_ndcg@10"]


def _study_over(per_user: list[np.ndarray], warm: int) -> tuple[Any, dict[int, np.ndarray]]:
    """A finished Optuna study whose trial ``n`` scores ``per_user[n]`` (the first ``warm``
    enqueued as warm starts), and the per-user table :func:`lab.tuning.choose_trial` reads."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for n in range(warm):
        study.enqueue_trial({"x": float(n)})
    table = dict(enumerate(per_user))

    def objective(trial: Any) -> float:
        trial.suggest_float("x", 0.0, 10.0)
        return float(table[trial.number].mean())

    study.optimize(objective, n_trials=len(per_user))
    return study, table


def test_a_searched_trial_replaces_the_warm_start_only_when_significantly_better() -> None:
    rng = np.random.default_rng(0)
    base = rng.random(400)
    noise = rng.normal(0.0, 0.3, size=400)
    warm = [base, base - 0.05]
    # Slightly better on average, but as much worse as better user by user: the luck of a trial.
    lucky = [*warm, base + 0.01 + noise]
    study, table = _study_over(lucky, warm=2)
    chosen, record = choose_trial(study, table, 2)
    assert chosen.number == 0 and record["chosen_by"] == "warm start"
    assert record["best"] == {"x": 0.0} and record["valid_ndcg@10"] == float(base.mean())
    assert record["search_best"]["valid_ndcg@10"] > record["valid_ndcg@10"]
    assert record["search_vs_warm_start"]["wilcoxon_p"] >= SEARCH_ALPHA
    # Better for most users: the search's trial is kept.
    better = [*warm, base + np.abs(noise) * 0.1]
    study, table = _study_over(better, warm=2)
    chosen, record = choose_trial(study, table, 2)
    assert chosen.number == 2 and record["chosen_by"] == "search"
    assert record["search_vs_warm_start"]["wilcoxon_p"] < SEARCH_ALPHA
    # A search that found nothing better keeps the best warm start without a test.
    study, table = _study_over([base - 0.05, base, base - 0.1], warm=2)
    chosen, record = choose_trial(study, table, 2)
    assert chosen.number == 1 and "search_vs_warm_start" not in record


def test_gen_search_keeps_the_preset_unless_a_trial_is_significantly_better(split: Split) -> None:
    cfg = GenConfig(n_items=split.n_items, hidden=16, layers=1, heads=2, ffn=32, max_len=8)
    chosen, record = search_gen(split, cfg, 3.0, text_embeddings=None, trials=3, say=lambda _: None)
    trials = record["trials"]
    assert trials[0]["params"] == {"lr": cfg.lr, "dropout": cfg.dropout, "hidden": cfg.hidden}
    if record["chosen_by"] == "warm start":
        assert {k: chosen[k] for k in ("lr", "dropout", "hidden")} == trials[0]["params"]
        assert record["valid_ndcg@10"] == trials[0]["valid_ndcg@10"]
    else:
        assert record["search_vs_warm_start"]["wilcoxon_p"] < SEARCH_ALPHA
        assert record["valid_ndcg@10"] == max(t["valid_ndcg@10"] for t in trials)
    assert chosen["ffn"] >= 2 * int(chosen["hidden"])


def test_gen_search_is_skipped_when_an_epoch_outlasts_a_trial(split: Split) -> None:
    cfg = GenConfig(n_items=split.n_items, hidden=16, layers=1, heads=2, ffn=32)
    chosen, record = search_gen(split, cfg, 1e-6, text_embeddings=None, say=lambda _: None)
    assert chosen == {}
    assert "outlast" in record["skipped"]
    assert record["trials"] == []


def test_train_on_a_folder_searches_and_records_the_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    # The plan the phases shared, and the seconds each took, are in the artifact.
    assert log["plan"]["source"] == "budget"
    assert log["plan"]["search_s"] == 3.0
    assert {"load", "search", "gen", "fits"} <= set(log["phase_seconds"])
    # Every CF part's chosen settings, whatever its weight, for `recstream eval` to reuse.
    assert log["baselines"]["ease"]["lam"] == search["ease"]["best"]["lam"]
    assert log["baselines"]["ease"]["markov_last"] == search["ease"]["best"]["markov_last"]
    assert log["baselines"]["itemknn"]["k_neighbours"] == search["itemknn"]["best"]["k_neighbours"]
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
    # `recstream eval` fits the baselines with the settings training chose, not its grid.
    from lab.cli import eval_cmd

    monkeypatch.setenv("RECSTREAM_ARTIFACT_ALLOW_UNSIGNED", "true")
    report_path = tmp_path / "report.json"
    models = "pop,itemknn,ease,gen,gen+ease,fused,served"
    args = ["--dataset", str(data), "--models", models, "--artifact", str(out)]
    result = CliRunner().invoke(eval_cmd, [*args, "--threads", "1", "--out", str(report_path)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["_meta"]["baselines_tuned"] == {
        "itemknn": "settings chosen in training",
        "ease": "settings chosen in training",
    }
    assert report["ease"]["ndcg@10"] >= 0.0
    assert {"fused", "served", "gen+ease"} <= set(report)
