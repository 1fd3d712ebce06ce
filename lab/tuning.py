"""Budgeted hyper-parameter search on validation, for datasets no preset was chosen on.

``recstream train --tune-budget MINUTES`` (on by default for a dataset that is not one of the
named MovieLens sets) searches with Optuna's TPE sampler, seeded, on validation NDCG@10 only:

- EASE (``lam``, ``decay``, and its Markov term's weight ``beta`` and reach ``markov_last``) and
  item-kNN (``k_neighbours``, ``decay``), each in its share of the budget. The evaluation grid's
  points that did best on the MovieLens sets are enqueued first, so the presets are warm starts
  and the search can only add to them; for EASE, so is the first of them with the Markov term on
  the last item only, at two strengths (data whose next item follows the previous one, as in a
  shop's "bought next", wants that; the MovieLens sets did not). EASE's Gram matrix and
  item-kNN's similarities are built once and reused by every trial, and trials at the same
  ``lam`` reuse its inverse (the warm starts at one ``lam`` come first).
- the transformer (``lr``, ``dropout``, ``hidden``): each trial is a training run cut to a
  fraction of the budget, the dataset's preset the first trial (its warm start). Runs that
  short favour settings that learn fast, so the trace says how long each trial had. When a
  trial would not hold :data:`MIN_TRIAL_EPOCHS` epochs over the catalog (large catalogs on
  CPU), the transformer keeps its preset, the trace says why, and the plan gives the unused
  time to its training.

For every searched part the search's best trial replaces the best warm start only when a paired
Wilcoxon test on the judged validation users says it is better (p < :data:`SEARCH_ALPHA`): on a
small validation split the best of many trials is mostly the luckiest, and a warm start chosen on
the MovieLens sets generalises better than it (measured on the small shops, docs/models.md).

Every trial (parameters, validation NDCG@10, seconds) is returned for the artifact's
``training.json``, with what was chosen and why.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from lab.baselines import EASE, TUNE_USERS, ItemKNN, Ranker, validation_ndcg_per_user
from lab.protocol import Split, significance

__all__ = [
    "GEN_SHARE",
    "SEARCH_ALPHA",
    "WARM_STARTS",
    "choose_trial",
    "epoch_seconds",
    "gen_trials_fit",
    "search_baseline",
    "search_gen",
    "split_budget",
]

GEN_SHARE = 0.6  # of the budget for the transformer's trials; the rest for EASE and item-kNN
# The search's best trial replaces the best warm start only when it is better on validation at
# this paired Wilcoxon p: on a few hundred validation users, the best of 200 trials is mostly
# the luckiest (docs/models.md, "Robustness: small shops").
SEARCH_ALPHA = 0.05
GEN_TRIALS = 4  # trials the transformer's share is cut into
# A trial must hold this many epochs to say anything: after one epoch every setting is still
# far from where it ends, and the time is better spent on training the preset longer.
MIN_TRIAL_EPOCHS = 3
# A trial is skipped for the transformer when tokens x catalog size per epoch exceeds this
# many per second of trial (full-softmax cost; about what one CPU thread does).
SOFTMAX_CELLS_PER_S = 2e7
WARM_STARTS: dict[str, list[dict[str, float]]] = {
    # The grid points chosen on ML-100K / ml-latest-small (docs/models.md), then the grid's centre.
    "ease": [
        {"lam": 1000.0, "decay": 0.9, "beta": 0.3, "markov_last": 3},
        {"lam": 1000.0, "decay": 0.9, "beta": 1.0, "markov_last": 1},
        {"lam": 1000.0, "decay": 0.9, "beta": 3.0, "markov_last": 1},
        {"lam": 300.0, "decay": 1.0, "beta": 1.0, "markov_last": 3},
    ],
    "itemknn": [{"k_neighbours": 50, "decay": 0.6}, {"k_neighbours": 200, "decay": 0.9}],
}


def split_budget(budget_s: float) -> tuple[float, float]:
    """``(baselines, transformer)`` seconds of a total budget."""
    return budget_s * (1.0 - GEN_SHARE), budget_s * GEN_SHARE


def epoch_seconds(split: Split, negatives: int = 0) -> float:
    """Estimated seconds of one training epoch of the transformer (tokens x scored items)."""
    tokens = sum(len(s) for s in split.train)
    scored = split.n_items if not 0 < negatives < split.n_items else negatives
    return tokens * scored / SOFTMAX_CELLS_PER_S


def gen_trials_fit(split: Split, budget_s: float, negatives: int = 0) -> bool:
    """Whether each of the transformer's search trials in ``budget_s`` holds
    :data:`MIN_TRIAL_EPOCHS` epochs (else the search keeps the preset)."""
    return epoch_seconds(split, negatives) * MIN_TRIAL_EPOCHS <= budget_s / GEN_TRIALS


def _suggest(name: str, trial: Any) -> dict[str, float]:
    if name == "ease":
        return {
            "lam": trial.suggest_float("lam", 30.0, 30_000.0, log=True),
            "decay": trial.suggest_float("decay", 0.5, 1.0),
            "beta": trial.suggest_float("beta", 0.0, 4.0),
            "markov_last": trial.suggest_int("markov_last", 1, 3),
        }
    return {
        "k_neighbours": trial.suggest_int("k_neighbours", 10, 500, log=True),
        "decay": trial.suggest_float("decay", 0.5, 1.0),
    }


def search_baseline(
    name: str,
    split: Split,
    budget_s: float,
    *,
    seed: int = 0,
    ease_max_items: int,
    max_trials: int = 200,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> tuple[Ranker, dict[str, Any]]:
    """EASE or item-kNN searched for ``budget_s`` seconds; the fitted best model and the trace."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model: Ranker = EASE(max_items=ease_max_items) if name == "ease" else ItemKNN()
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    for warm in WARM_STARTS[name]:
        study.enqueue_trial(warm)
    trace: list[dict[str, Any]] = []
    per_user: dict[int, np.ndarray] = {}  # trial number -> each judged user's NDCG@10
    fitted = False

    def objective(trial: Any) -> float:
        nonlocal fitted
        started = time.perf_counter()
        params = _suggest(name, trial)
        for key, value in params.items():
            setattr(model, key, value)
        if not fitted or name == "itemknn":
            model.fit(split)  # EASE: the Gram matrix once; lam re-solves lazily
            fitted = True
        per_user[trial.number] = validation_ndcg_per_user(model, split, TUNE_USERS)
        ndcg = float(per_user[trial.number].mean())
        trace.append(
            {
                "params": params,
                "valid_ndcg@10": ndcg,
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
        return ndcg

    # The warm starts that share the first one's ``lam`` (all of item-kNN's) cost one scoring
    # each once the model is fitted: they run even when that first fit outlasts the budget.
    first = WARM_STARTS[name][0]
    cheap = sum(1 for w in WARM_STARTS[name] if w.get("lam") == first.get("lam"))
    started = time.perf_counter()
    study.optimize(objective, n_trials=min(cheap, max_trials))
    left = budget_s - (time.perf_counter() - started)
    if left > 0 and max_trials > cheap:
        study.optimize(
            objective, n_trials=max_trials - cheap, timeout=left, show_progress_bar=progress
        )
    chosen, record = choose_trial(study, per_user, len(WARM_STARTS[name]))
    for key, value in chosen.params.items():
        setattr(model, key, value)
    model.fit(split)
    say(
        f"{name}: searched {len(trace)} trials in {budget_s:.0f}s budget, chosen "
        f"{record['chosen_by']} {chosen.params} valid ndcg@10 {chosen.value:.4f}"
    )
    return model, {**record, "trials": trace}


def choose_trial(
    study: Any, per_user: dict[int, np.ndarray], warm: int
) -> tuple[Any, dict[str, Any]]:
    """The trial to keep: the search's best where it beats the best warm start significantly.

    The first ``warm`` trials are the warm starts. Returns the trial and the record's
    ``best`` (its settings), ``valid_ndcg@10``, ``chosen_by`` and, when the search found
    better, the paired test of its best against the best warm start.
    """
    done = [t for t in study.trials if t.value is not None]
    best = max(done, key=lambda t: t.value)
    warm_best = max((t for t in done if t.number < warm), key=lambda t: t.value)
    record: dict[str, Any] = {"chosen_by": "warm start"}
    chosen = warm_best
    if best.value > warm_best.value:  # a searched trial
        test = significance(per_user[best.number], per_user[warm_best.number])
        record["search_best"] = {"params": dict(best.params), "valid_ndcg@10": best.value}
        record["search_vs_warm_start"] = test
        if test["wilcoxon_p"] < SEARCH_ALPHA:
            chosen, record["chosen_by"] = best, "search"
    record["best"] = dict(chosen.params)
    record["valid_ndcg@10"] = float(chosen.value)
    return chosen, record


def search_gen(
    split: Split,
    cfg: Any,
    budget_s: float,
    *,
    text_embeddings: np.ndarray | None,
    negatives: int = 0,
    fixed: frozenset[str] = frozenset(),
    trials: int = GEN_TRIALS,
    say: Callable[[str], None] = print,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The transformer's ``lr``, ``dropout`` and ``hidden`` searched in ``trials`` short runs.

    Settings in ``fixed`` (given on the command line) are not searched.
    Returns the chosen settings (to train with for the full budget) and the trace; ``{}`` and a
    reason when a trial would not hold :data:`MIN_TRIAL_EPOCHS` epochs.
    """
    import optuna

    from inference.generative import GenScorer
    from lab.training import distilled_targets, train_gen

    trial_s = budget_s / max(trials, 1)
    tokens = sum(len(s) for s in split.train)
    scored = split.n_items if not 0 < negatives < split.n_items else negatives
    epoch_s = epoch_seconds(split, negatives)
    if epoch_s * MIN_TRIAL_EPOCHS > trial_s:
        reason = (
            f"{MIN_TRIAL_EPOCHS} epochs (~{epoch_s:.0f}s each for {tokens} tokens x {scored} "
            f"scored items) would outlast a {trial_s:.0f}s trial; the preset is kept"
        )
        say(f"gen search skipped: {reason}")
        return {}, {"skipped": reason, "trials": []}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=int(cfg.seed))
    )
    searched = [n for n in ("lr", "dropout", "hidden") if n not in fixed]
    if not searched:
        return {}, {"skipped": "every searched setting was given on the command line", "trials": []}
    # A distilling transformer's teacher targets depend on neither searched setting: built once.
    taught = distilled_targets(split, cfg, negatives, progress=False)
    hidden_choices = sorted({32, 64, 128, int(cfg.hidden)})  # the preset's size is a choice
    study.enqueue_trial({n: getattr(cfg, n) for n in searched})
    trace: list[dict[str, Any]] = []
    per_user: dict[int, np.ndarray] = {}

    def objective(trial: Any) -> float:
        space = {
            "lr": lambda: trial.suggest_float("lr", min(5e-4, cfg.lr), max(1e-2, cfg.lr), log=True),
            "dropout": lambda: trial.suggest_float(
                "dropout", min(0.1, cfg.dropout), max(0.5, cfg.dropout)
            ),
            "hidden": lambda: trial.suggest_categorical("hidden", hidden_choices),
        }
        params = {n: space[n]() for n in searched}
        hidden = int(params.get("hidden", cfg.hidden))
        trial_cfg = replace(cfg, **params, ffn=max(cfg.ffn, 2 * hidden))
        model, log = train_gen(
            split,
            trial_cfg,
            text_embeddings=text_embeddings,
            time_budget_s=trial_s,
            negatives=negatives,
            taught=taught,
            progress=False,
            say=lambda _: None,
        )
        per_user[trial.number] = validation_ndcg_per_user(GenScorer(model, trial_cfg), split)
        trace.append(
            {
                "params": params,
                "valid_ndcg@10": log["valid_ndcg@10"],
                "epochs": log["epochs_run"],
                "seconds": round(log["train_seconds"], 1),
            }
        )
        say(f"  gen trial {params}: valid ndcg@10 {log['valid_ndcg@10']:.4f}")
        return float(log["valid_ndcg@10"])

    study.optimize(objective, n_trials=trials)
    chosen, record = choose_trial(study, per_user, 1)
    best = dict(chosen.params)
    best["ffn"] = max(cfg.ffn, 2 * int(best.get("hidden", cfg.hidden)))
    say(f"gen: searched {len(trace)} trials of {trial_s:.0f}s, chosen {record['chosen_by']} {best}")
    return best, {**record, "best": best, "trial_seconds": trial_s, "trials": trace}
