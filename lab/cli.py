"""Commands of the lab: ``recstream train``, ``eval``, ``artifact keygen/sign`` and ``data``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from inference.postprocess import PostConfig
from lab.datasets import NAMED as _NAMED
from lab.plan import (
    BUDGET_MINUTES,
    PRESET_GEN_MINUTES,
    SAMPLED_ABOVE,
    SAMPLED_NEGATIVES,
    SEARCH_MINUTES,
    SEARCH_SHARE,
)
from lab.settings import FetchSettings
from recstream.options import given, settings_options

# The eval options of the served post-processing read their help from its settings fields.
_POST = PostConfig.model_fields

_DATASET_HELP = (
    "Dataset name (ml-100k, ml-latest-small, ml-latest-small-llamarec; found under "
    "RECSTREAM_DATA_DIR, downloaded by `recstream data fetch`) or a folder with interactions.csv "
    "[+ items.csv]."
)


def _dataset(dataset: str) -> tuple[Any, Any]:
    """The dataset and its leave-one-out split."""
    from lab.datasets import load_dataset
    from lab.protocol import leave_one_out
    from recstream.settings import CommonSettings

    ds = load_dataset(dataset, CommonSettings().data_dir)
    return ds, leave_one_out(ds)


def _threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _gen_overrides(**given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}


def gen_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """Parse ``KEY=VALUE`` pairs into transformer settings, each to its field's type."""
    from inference.generative import GenConfig

    defaults = GenConfig().to_json()
    known = {k: type(v) for k, v in defaults.items() if k not in ("n_items", "extra")}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            raise click.BadParameter(
                f"{pair!r}: expected KEY=VALUE, KEY one of {', '.join(sorted(known))}",
                param_hint="--set",
            )
        kind = known[key]
        if kind is bool:
            if raw.lower() not in ("true", "false"):
                raise click.BadParameter(f"{pair!r}: {key} is true or false", param_hint="--set")
            out[key] = raw.lower() == "true"
            continue
        try:
            out[key] = kind(raw)
        except ValueError:
            raise click.BadParameter(
                f"{pair!r}: {key} must be {kind.__name__}", param_hint="--set"
            ) from None
    return out


@click.command("train")
@click.option("--dataset", required=True, help=_DATASET_HELP)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="New artifact folder (must not exist or be empty).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option("--epochs", type=int, default=None, help="Maximum epochs (early stopping decides).")
@click.option(
    "--budget-minutes",
    type=click.FloatRange(min=0.5),
    default=None,
    help="Minutes for the whole run, shared by its phases (search, transformer, the fits after "
    "it; the plan is printed first and recorded in training.json). Default: "
    f"{BUDGET_MINUTES:g} for a dataset without a preset; the named sets keep their preset plan "
    f"(the transformer capped at {PRESET_GEN_MINUTES:g} min, no search).",
)
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0.0),
    default=None,
    help="The transformer's own minutes (the best epoch so far is kept), instead of its share "
    "of the plan; its second training, which judges the recent-popularity blend, takes at most "
    "as long again.",
)
@click.option("--hidden", type=int, default=None, help="Hidden size of the transformer.")
@click.option("--layers", type=int, default=None, help="Transformer layers.")
@click.option("--dropout", type=float, default=None, help="Dropout on embeddings and output.")
@click.option("--max-len", type=int, default=None, help="Longest history the model reads.")
@click.option("--lr", type=float, default=None, help="AdamW learning rate.")
@click.option(
    "--lr-schedule",
    type=click.Choice(["constant", "cosine"]),
    default=None,
    help="Learning-rate schedule (cosine decays to 0 over --epochs).",
)
@click.option("--patience", type=int, default=None, help="Epochs without improvement to stop.")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other transformer setting over the dataset's preset, e.g. --set ema=0 "
    "--set future=3 (repeatable; see GenConfig).",
)
@click.option(
    "--text-init/--no-text-init",
    default=None,
    help="Initialise item embeddings from MiniLM text embeddings (the presets do).",
)
@click.option(
    "--index/--no-index",
    "with_index",
    default=True,
    show_default=True,
    help="Build the FAISS index of item text embeddings into the artifact.",
)
@click.option(
    "--hybrid/--no-hybrid",
    default=True,
    show_default=True,
    help="Also fit EASE, item-kNN and popularity (tuned on validation) and the weights that fuse "
    "them with the transformer (chosen on validation; a single model when fusing does not help), "
    "and store them so the artifact serves the fusion.",
)
@click.option(
    "--ease-max-items",
    type=click.IntRange(min=1),
    default=None,
    help="EASE is solved for this many most frequent items (a dense inverse of this size); "
    "rarer items are left to item-kNN, the transformer and EASE's Markov term. Default: the "
    "whole catalog up to the size whose inverse fits the plan's memory and time.",
)
@click.option(
    "--negatives",
    type=click.IntRange(min=0),
    default=None,
    help="Train the transformer with a sampled softmax over the batch's targets and this many "
    f"random items (0: full softmax). Default: {SAMPLED_NEGATIVES} for catalogs over "
    f"{SAMPLED_ABOVE:,} items, else 0.",
)
@click.option(
    "--tune-budget",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Minutes of hyper-parameter search on validation (Optuna) for EASE, item-kNN and the "
    f"transformer before training; the presets are its warm starts. Default: the plan's, "
    f"{SEARCH_MINUTES:g} min (at most {SEARCH_SHARE:.0%} of the budget; the transformer's "
    "trials are left out when they could not hold a few epochs) for a dataset without a "
    "preset (a folder), 0 (the presets as they are) for the named ones.",
)
@click.option(
    "--cf-top-k",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="EASE weights kept per item in the artifact (largest |w|); the rest are pruned.",
)
@click.option(
    "--signing-key-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="RECSTREAM_ARTIFACT_SIGNING_KEY_FILE",
    show_envvar=True,
    default=None,
    help="Ed25519 private key that signs the manifest (`recstream artifact keygen`); the key "
    "itself may instead come from RECSTREAM_ARTIFACT_SIGNING_KEY. Without either the artifact "
    "is unsigned, and services refuse it unless they allow unsigned artifacts.",
)
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads for torch.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
def train_cmd(  # noqa: PLR0917 (click passes every option)
    dataset: str,
    out: Path,
    seed: int,
    epochs: int | None,
    budget_minutes: float | None,
    max_minutes: float | None,
    hidden: int | None,
    layers: int | None,
    dropout: float | None,
    max_len: int | None,
    lr: float | None,
    lr_schedule: str | None,
    patience: int | None,
    settings: tuple[str, ...],
    text_init: bool | None,
    with_index: bool,
    hybrid: bool,
    ease_max_items: int | None,
    negatives: int | None,
    tune_budget: float | None,
    cf_top_k: int,
    signing_key_file: Path | None,
    threads: int,
    progress: bool,
) -> None:
    """Train the generative transformer on DATASET and write a verified artifact to --out.

    Uses the training part of the leave-one-out split, early-stops on validation NDCG@10, and
    writes config, weights (safetensors), item vocabulary, FAISS index and a SHA-256 manifest.
    With --hybrid (default) it then fits EASE, item-kNN and popularity on the same training data,
    chooses the weights that fuse them with the transformer on validation and stores the CF parts
    of non-zero weight (EASE pruned), so the artifact serves the fusion. With the index too, it fits
    the cold-start retrieval (weight and history threshold) on validation prefixes and stores it,
    and chooses the blend of recent popularity for histories of 1-3 items on held-out users.
    A dataset without item text trains without text initialisation and without the index.
    """
    import time

    started = time.monotonic()
    chosen = gen_settings(settings)  # a typo fails here, before minutes of loading
    key = _signing_key(signing_key_file)  # and so does a bad key
    _threads(threads)
    from inference.embeddings import catalog_vectors
    from inference.generative import GenConfig
    from inference.integrity import key_id
    from lab.artifact import save_artifact
    from lab.evaluate import gen_preset
    from lab.plan import plan_training
    from lab.training import train_gen

    ds, split = _dataset(dataset)
    plan = plan_training(
        split,
        preset=split.dataset in _NAMED,
        budget_minutes=budget_minutes,
        gen_minutes=max_minutes,
        tune_minutes=tune_budget,
        ease_max_items=ease_max_items,
        negatives=negatives,
        hybrid=hybrid,
    )
    click.echo(
        f"{split.dataset}: {len(split.train):,} users, {split.n_items:,} items, "
        f"{sum(len(s) for s in split.train):,} training interactions"
    )
    click.echo(plan.describe())
    phases: dict[str, float] = {"load": time.monotonic() - started}
    overrides = _gen_overrides(
        epochs=epochs,
        hidden=hidden,
        layers=layers,
        dropout=dropout,
        max_len=max_len,
        lr=lr,
        lr_schedule=lr_schedule,
        patience=patience,
        text_init=text_init,
    )
    preset = gen_preset(split.dataset)
    if not _has_text(split):
        # Ids are all there is to embed: text vectors would be noise.
        preset["text_init"] = False
        if with_index:
            click.echo(f"{split.dataset}: no item text; no text initialisation, no index")
        with_index = False
    cfg = GenConfig(seed=seed, **{**preset, **chosen, **overrides})
    if cfg.distill > 0 and (0 < plan.negatives < split.n_items or cfg.future != 1):
        raise click.UsageError(
            "distill needs the full softmax over the catalog and the next-item target "
            "(--negatives 0, future=1)"
        )
    text = catalog_vectors(split.item_ids, split.items) if (cfg.text_init or with_index) else None
    searched: dict[str, Any] = {}
    tuned: dict[str, Any] = {}
    if plan.search_s > 0:
        from dataclasses import replace

        from lab.tuning import search_baseline, search_gen

        mark = time.monotonic()
        cf_s, gen_s = plan.search_cf_s, plan.search_gen_s
        click.echo(
            f"search: {plan.search_s / 60:g} min on validation ({cf_s:.0f}s CF, {gen_s:.0f}s gen)"
        )
        if hybrid:
            for name in ("ease", "itemknn"):
                tuned[name], searched[name] = search_baseline(
                    name,
                    split,
                    cf_s / 2,
                    seed=seed,
                    ease_max_items=plan.ease_max_items,
                    progress=progress,
                    say=click.echo,
                )
        fixed = set(chosen) | set(overrides)  # what the command line set is not searched
        best, searched["gen"] = search_gen(
            split,
            cfg,
            gen_s,
            text_embeddings=text,
            negatives=plan.negatives,
            fixed=frozenset(fixed),
            say=click.echo,
        )
        cfg = replace(cfg, **{k: v for k, v in best.items() if k not in fixed})
        phases["search"] = time.monotonic() - mark
    mark = time.monotonic()
    teacher = None
    if cfg.distill > 0:
        from lab.evaluate import baseline
        from lab.training import ease_teacher

        # The teacher is EASE with the settings validation chose, which the fusion reuses.
        tuned.setdefault(
            "ease", baseline("ease", split, say=click.echo, ease_max_items=plan.ease_max_items)
        )
        teacher = ease_teacher(tuned["ease"].params())
    gen_budget_s = plan.gen_deadline(time.monotonic() - started)
    click.echo(f"transformer: up to {gen_budget_s:.0f}s")
    model, log = train_gen(
        split,
        cfg,
        text_embeddings=text,
        time_budget_s=gen_budget_s,
        negatives=plan.negatives,
        teacher=teacher,
        progress=progress,
        say=click.echo,
    )
    phases["gen"] = time.monotonic() - mark
    log["dataset"] = split.dataset
    if searched:
        log["search"] = {"budget_minutes": plan.search_s / 60, **searched}
    mark = time.monotonic()
    mixed = _fit_fusion(split, model, cfg, plan.ease_max_items, tuned) if hybrid else None
    if mixed is not None:
        log["fusion"] = mixed.summary()
        log["baselines"] = _baseline_params(mixed)
    retrieval = _fit_retrieval(split, mixed, text) if mixed is not None and with_index else None
    trending = None
    if mixed is not None:
        judge = _Judge(
            cfg,
            text,
            negatives=plan.negatives,
            teacher=teacher,
            epochs=max(1, int(log["best_epoch"])),
            seconds=min(plan.judge_s, float(log["train_seconds"])),
            progress=progress,
        )
        grid: list[dict[str, Any]] = []
        trending = _fit_trending(ds, split, mixed, plan.ease_max_items, judge, grid)
        log["trending_judge"] = judge.record
        log["trending_grid"] = grid
    phases["fits"] = time.monotonic() - mark
    log["plan"] = {**plan.to_json(), "gen_budget_s": round(gen_budget_s, 1)}
    # Saving is timed as well but cannot be recorded in the file it writes; it is printed.
    log["phase_seconds"] = {k: round(v, 1) for k, v in phases.items()}
    mark = time.monotonic()
    version = save_artifact(
        out,
        model,
        split,
        log,
        text_embeddings=text if with_index else None,
        hybrid=mixed,
        cf_top_k=cf_top_k,
        retrieval=retrieval,
        trending=trending,
        key=key,
    )
    phases["save"] = time.monotonic() - mark
    if key is None:
        click.echo(
            f"{out}: UNSIGNED (no signing key configured); services refuse it unless "
            "they allow unsigned artifacts"
        )
    else:
        click.echo(f"{out}: manifest signed by key {key_id(key.public_key())}")
    click.echo(
        f"trained {version}: valid ndcg@10 {log['valid_ndcg@10']:.4f} at epoch "
        f"{log['best_epoch']} ({log['train_seconds']:.0f}s) -> {out}"
    )
    spent = ", ".join(f"{k} {v:.0f}s" for k, v in phases.items())
    click.echo(f"phases: {spent}; {time.monotonic() - started:.0f}s in all")
    if mixed is not None:
        singles = ", ".join(f"{n} {v:.4f}" for n, v in mixed.valid_ndcg.items() if n != "fused")
        weights = ", ".join(f"{n} {w:.3f}" for n, w in mixed.weights.items() if w > 0)
        click.echo(
            f"served {mixed.name}: weights {weights}; valid ndcg@10 "
            f"{mixed.valid_ndcg['fused']:.4f} (alone: {singles}); EASE pruned to {cf_top_k} "
            "weights per item"
        )


def _fit_retrieval(split: Any, mixed: Any, text: Any) -> Any:
    """Cold-start retrieval's weight and threshold for the fitted hybrid, on validation."""
    from inference.index import ItemIndex
    from inference.retrieval import TextRetrieval
    from lab.hybrid import fit_retrieval

    found = TextRetrieval(ItemIndex.build(split.item_ids, text), split.item_ids)
    chosen = fit_retrieval(mixed, found, split)
    click.echo(
        f"retrieval: weight {chosen.weight}, histories under {chosen.max_history} items "
        "(validation NDCG@10 of short history prefixes; weight 0 = off)"
    )
    return chosen


def _fit_trending(  # noqa: PLR0917 - the training's parts, all named at the call
    ds: Any, split: Any, fusion: Any, ease_max_items: int, judge: Any, grid: list[Any]
) -> Any:
    """The recent-popularity blend of short histories, chosen on held-out users with EASE's
    settings of the fusion (or tuned now when the fusion has no EASE): the largest gain on their
    later items that costs nothing on their next ones, judged with EASE and with the served
    fusion fitted without one fold's users (its transformer trained again by ``judge``). Every
    blend's changes go to ``grid``."""
    from inference.trending import TrendingConfig
    from lab.evaluate import baseline, choose_trending
    from lab.trending import PREFIXES, RecentPopularity

    ease = fusion.components.get("ease")
    if ease is None:
        ease = baseline("ease", split, say=click.echo, ease_max_items=ease_max_items)
    served = None if judge.seconds <= 0 else (lambda part: fusion.refitted(part, judge))
    _, choice = choose_trending(
        split, RecentPopularity(ds, split), ease, PREFIXES, click.echo, served=served, record=grid
    )
    gains = choice.next_gains
    return TrendingConfig(
        days=round(choice.days),
        weight=choice.weight,
        below=max(PREFIXES) + 1,
        idle_s=round(choice.idle),
        gain=choice.gain,
        next_gain=gains[0] if gains else None,
        served_next_gain=gains[1] if len(gains) > 1 else None,
    )


class _Judge:
    """Trains the transformer again, as ``recstream train`` did, on a split whose held-out users
    (those left without training items) are out of validation too: the served model's stand-in
    for users it never saw. At most ``epochs`` (the served transformer's best) and ``seconds``;
    ``record`` says what it did, for ``training.json``."""

    def __init__(
        self,
        cfg: Any,
        text: Any,
        *,
        negatives: int,
        teacher: Any,
        epochs: int,
        seconds: float,
        progress: bool,
    ) -> None:
        self.cfg, self.text, self.negatives, self.teacher = cfg, text, negatives, teacher
        self.epochs, self.seconds, self.progress = epochs, seconds, progress
        self.record: dict[str, Any] = {
            "trained": False,  # the served fusion may have no transformer to train again
            "max_epochs": epochs,
            "max_seconds": round(seconds, 1),
        }

    def __call__(self, part: Any) -> Any:
        from dataclasses import replace

        import numpy as np

        from inference.generative import GenScorer
        from lab.training import train_gen

        out = np.asarray([len(s) == 0 for s in part.train])
        seen = replace(
            part,
            valid_target=np.where(out, -1, part.valid_target),
            test_target=np.where(out, -1, part.test_target),
        )
        cfg = replace(self.cfg, epochs=self.epochs)
        click.echo(
            f"recent popularity: training the transformer again without {int(out.sum()):,} "
            f"users to judge the blend as served (up to {self.epochs} epochs, {self.seconds:.0f}s)"
        )
        model, log = train_gen(
            seen,
            cfg,
            text_embeddings=self.text,
            time_budget_s=self.seconds,
            negatives=self.negatives,
            teacher=self.teacher,
            progress=self.progress,
            say=click.echo,
        )
        self.record.update(
            trained=True,
            users_held_out=int(out.sum()),
            epochs_run=log["epochs_run"],
            best_epoch=log["best_epoch"],
            valid_ndcg=round(float(log["valid_ndcg@10"]), 4),
            seconds=round(float(log["train_seconds"]), 1),
        )
        return GenScorer(model, cfg)


def _has_text(split: Any) -> bool:
    """Whether any item has a title of its own (a generic dataset may have none)."""
    return any(item.title and item.title != item.item_id for item in split.items.values())


def _baseline_params(fusion: Any) -> dict[str, dict[str, Any]]:
    """Each CF part's settings chosen on validation, whatever its weight (for ``eval``)."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("ease", "itemknn"):
        part = fusion.components.get(name)
        if part is not None:
            out[name] = {
                **part.params(),
                "valid_ndcg@10": float(fusion.valid_ndcg.get(name, float("nan"))),
            }
    return out


def _fit_fusion(
    split: Any, model: Any, cfg: Any, ease_max_items: int, tuned: dict[str, Any]
) -> Any:
    """EASE, item-kNN and popularity tuned on validation (grid, or the search's ``tuned``
    models), then fused with the transformer."""
    import time

    from inference.generative import GenScorer
    from lab.evaluate import baseline
    from lab.hybrid import Fusion

    started = time.perf_counter()
    parts = {
        name: tuned.get(name)
        or baseline(name, split, say=click.echo, ease_max_items=ease_max_items)
        for name in ("ease", "itemknn", "pop")
    }
    fusion = Fusion({"gen": GenScorer(model, cfg), **parts}).fit(split)
    click.echo(f"fusion fitted in {time.perf_counter() - started:.0f}s")
    return fusion


@click.command("eval")
@click.option("--dataset", required=True, help=_DATASET_HELP)
@click.option(
    "--models",
    default="pop,itemknn,ease,gen,gen+ease,gen+rerank",
    show_default=True,
    help="Comma-separated models: pop, itemknn, ease, gen, gen+ease (hybrid), fused (gen, EASE, "
    "item-kNN and popularity fused, weights chosen on validation here), served (each --artifact "
    "exactly as the workers serve it), gen+ease+post "
    "(the hybrid with the served cosine floor / MMR), gen+rerank.",
)
@click.option(
    "--out",
    "out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the JSON report here (and the plot beside it as .png).",
)
@click.option(
    "--seeds",
    type=int,
    default=1,
    show_default=True,
    help="Seeds for the trained models (ignored with --artifact).",
)
@click.option(
    "--artifact",
    "artifacts",
    type=click.Path(path_type=Path, exists=True),
    multiple=True,
    help="Evaluate these trained artifacts as `gen` (one per seed).",
)
@click.option(
    "--gen-minutes",
    type=float,
    default=14.0,
    show_default=True,
    help="Training budget per seed when gen is trained here.",
)
@click.option(
    "--rerank-top",
    type=int,
    default=20,
    show_default=True,
    help="Candidates from gen that the language model reranks.",
)
@click.option(
    "--rerank-users",
    type=int,
    default=None,
    help="Run gen+rerank on the first N test users only (the language model is slow on CPU); "
    "gen is compared on the same users.",
)
@click.option(
    "--cosine-floor",
    type=float,
    default=None,
    help=f"gen+ease+post: {_POST['cosine_floor'].description} (0.0 when neither step is given).",
)
@click.option(
    "--mmr-lambda",
    type=float,
    default=None,
    help=f"gen+ease+post: {_POST['mmr_lambda'].description}",
)
@click.option(
    "--post-candidates",
    type=int,
    default=_POST["candidates"].default,
    show_default=True,
    help=f"gen+ease+post: {_POST['candidates'].description}",
)
@click.option(
    "--cold-start",
    "cold_start",
    default=None,
    metavar="N,N,...",
    help="Also run the cold-start protocol: each test user's history cut to their first N "
    "training items (e.g. 1,2,3), same targets; gen+ease alone, with retrieval, and with recent "
    "popularity (each --artifact's own blend; without artifacts, one chosen here on held-out "
    "users with EASE).",
)
@click.option(
    "--retrieval-weight",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Cold start: use this retrieval weight instead of fitting it on validation "
    "(with --retrieval-below).",
)
@click.option(
    "--retrieval-below",
    type=click.IntRange(min=0),
    default=4,
    show_default=True,
    help="Cold start, with --retrieval-weight: retrieval serves histories shorter than this.",
)
@click.option(
    "--ease-max-items",
    type=click.IntRange(min=1),
    default=None,
    help="EASE is solved for this many most frequent items. Default: the artifact's bound, "
    "else the whole catalog up to the size whose inverse fits in memory.",
)
@click.option(
    "--baselines",
    "baselines_from",
    type=click.Choice(["artifact", "grid"]),
    default="artifact",
    show_default=True,
    help="artifact: EASE and item-kNN take the settings the first --artifact's training chose "
    "on validation (its training.json; fitted once, no grid), where it has them; grid: search "
    "the validation grid again.",
)
@click.option("--threads", type=int, default=2, show_default=True, help="CPU threads for torch.")
def eval_cmd(  # noqa: PLR0917 (click passes every option)
    dataset: str,
    models: str,
    out: Path | None,
    seeds: int,
    artifacts: tuple[Path, ...],
    gen_minutes: float,
    rerank_top: int,
    rerank_users: int | None,
    cosine_floor: float | None,
    mmr_lambda: float | None,
    post_candidates: int,
    cold_start: str | None,
    retrieval_weight: float | None,
    retrieval_below: int,
    ease_max_items: int | None,
    baselines_from: str,
    threads: int,
) -> None:
    """Evaluate models on DATASET's test split: table, JSON report and PNG plot.

    Full-catalog ranking, seen items masked, time-ordered leave-one-out; baselines tuned on
    validation; the generative model compared with the best baseline by paired per-user tests.
    """
    import time

    prefixes = _prefixes(cold_start)
    _threads(threads)
    from inference.retrieval import RetrievalConfig
    from lab.evaluate import COMPARED, cold_start_table, plot_report, run_eval, table
    from lab.trending import RecentPopularity

    started = time.monotonic()
    ds, split = _dataset(dataset)
    names = [m.strip() for m in models.split(",") if m.strip()]
    chosen = (
        _artifact_baselines(artifacts[0], split)
        if artifacts and baselines_from == "artifact"
        else {}
    )
    report = run_eval(
        split,
        names,
        seeds=seeds,
        artifacts=artifacts,
        gen_minutes=gen_minutes,
        rerank_top=rerank_top,
        rerank_users=rerank_users,
        post=PostConfig(
            cosine_floor=cosine_floor, mmr_lambda=mmr_lambda, candidates=post_candidates
        ),
        cold_start_prefixes=prefixes,
        recent=RecentPopularity(ds, split) if prefixes else None,
        retrieval=None
        if retrieval_weight is None
        else RetrievalConfig(weight=retrieval_weight, max_history=retrieval_below),
        ease_max_items=ease_max_items,
        baseline_params=chosen,
        say=click.echo,
    )
    report["_meta"]["eval_seconds"] = round(time.monotonic() - started, 1)
    click.echo(table(report))
    meta = report["_meta"]
    click.echo(
        f"dataset {meta['dataset']}: {meta['users']} users, {meta['items']} items; "
        f"out-of-catalog recommendations: {meta['out_of_catalog_total']}"
    )
    for name in COMPARED:
        if name in report and "vs_best_baseline" in report[name]:
            v = report[name]["vs_best_baseline"]
            click.echo(
                f"{name} vs {v['baseline']}: NDCG@10 {v['ndcg_gain_pct']:+.1f}%, "
                f"Wilcoxon p={v['wilcoxon_p']:.3g}, paired t p={v['paired_t_p']:.3g}"
            )
    for name in ("fused", "served"):
        if "vs_best_single" in report.get(name, {}):
            v = report[name]["vs_best_single"]
            click.echo(
                f"{name} vs {v['model']} (best single model on test): NDCG@10 "
                f"{v['ndcg_gain_pct']:+.1f}%, Wilcoxon p={v['wilcoxon_p']:.3g}"
            )
    click.echo(f"eval took {report['_meta']['eval_seconds']:.0f}s")
    if "_cold_start" in report:
        click.echo("cold start (test targets; history = first N training items):")
        click.echo(cold_start_table(report["_cold_start"]))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2), encoding="utf-8")
        plot_report(report, out.with_suffix(".png"))
        click.echo(f"wrote {out} and {out.with_suffix('.png')}")


def _artifact_baselines(folder: Path, split: Any) -> dict[str, dict[str, float]]:
    """The baselines' settings an artifact's training chose on validation (``training.json``'s
    ``"baselines"``), read from the verified artifact; ``{}`` for one trained before they were
    recorded. An artifact trained on other data is refused."""
    from inference.exceptions import ArtifactError
    from inference.integrity import verify_manifest

    try:
        verified = verify_manifest(folder)
        log = json.loads(verified.read("training.json"))
    except (ArtifactError, ValueError) as exc:
        raise click.ClickException(f"{folder}: {exc}") from exc
    if verified.manifest.get("training_data_sha256") != dict(split.sha256):
        raise click.ClickException(f"artifact {folder} was not trained on {split.dataset}")
    found = log.get("baselines") if isinstance(log, dict) else None
    if not isinstance(found, dict):
        return {}
    return {
        name: {k: float(v) for k, v in params.items() if k != "valid_ndcg@10"}
        for name, params in found.items()
        if isinstance(params, dict)
    }


def _prefixes(raw: str | None) -> tuple[int, ...]:
    """``--cold-start 1,2,3`` as prefix lengths (each at least 1)."""
    if raw is None:
        return ()
    try:
        out = tuple(int(p) for p in raw.split(",") if p.strip())
    except ValueError:
        raise click.BadParameter(f"{raw!r}: expected N,N,...", param_hint="--cold-start") from None
    if not out or min(out) < 1:
        raise click.BadParameter(f"{raw!r}: prefixes are at least 1", param_hint="--cold-start")
    return out


def _signing_key(key_file: Path | None) -> Any:
    """The configured signing key (the flag's file, else the environment's), or ``None``."""
    from inference.integrity import signing_key
    from inference.settings import ArtifactSigning

    if key_file is not None:
        return signing_key(ArtifactSigning(signing_key=None, signing_key_file=key_file))
    return signing_key(ArtifactSigning())


@click.group("artifact")
def artifact_group() -> None:
    """Artifact signing keys."""


@artifact_group.command("keygen")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for artifact-signing.key (mode 0600, for `recstream train`) and "
    "artifact-signing.pub (for the services: RECSTREAM_ARTIFACT_VERIFY_KEY or _FILE).",
)
def keygen_cmd(out: Path) -> None:
    """Write a new Ed25519 key pair for signing artifacts; never overwrites a key."""
    from inference.integrity import generate_keypair

    key_path, pub_path = generate_keypair(out)
    # The public key is safe to show; the private key is only named by its path.
    click.echo(f"private key: {key_path} (keep it with training only)")
    click.echo(f"public key:  {pub_path}: {pub_path.read_text(encoding='ascii').strip()}")


@artifact_group.command("sign")
@click.argument("folder", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option(
    "--signing-key-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    envvar="RECSTREAM_ARTIFACT_SIGNING_KEY_FILE",
    show_envvar=True,
    default=None,
    help="The new signing key (else RECSTREAM_ARTIFACT_SIGNING_KEY).",
)
@click.option(
    "--adopt-unsigned",
    is_flag=True,
    help="Accept an artifact that has no signature yet (made before signing); its hashes are "
    "still checked.",
)
def sign_cmd(folder: Path, signing_key_file: Path | None, adopt_unsigned: bool) -> None:
    """Sign FOLDER again after checking it under the current verify keys (key rotation)."""
    from inference.exceptions import ArtifactError
    from inference.integrity import key_id
    from inference.settings import ArtifactTrust
    from lab.artifact import sign_artifact

    key = _signing_key(signing_key_file)
    if key is None:
        raise click.UsageError("no signing key (--signing-key-file or the environment)")
    trust = ArtifactTrust()
    if adopt_unsigned:
        trust = trust.model_copy(update={"allow_unsigned": True})
    try:
        sign_artifact(folder, key, trust)
    except ArtifactError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{folder}: manifest signed by key {key_id(key.public_key())}")


@click.group("data")
def data_group() -> None:
    """The MovieLens datasets: download them from GroupLens, verified, and list what is here."""


@data_group.command("fetch")
@click.argument("name", type=click.Choice(_NAMED))
@click.option("--force", is_flag=True, help="Replace a folder that is there but does not verify.")
@settings_options(FetchSettings, only=("data_dir", "data_base_url", "data_timeout_s"))
def fetch_cmd(name: str, force: bool, **flags: Any) -> None:
    """Download dataset NAME from its publisher into the data directory and print its terms.

    The archive's SHA-256 must match the one pinned in recstream (otherwise nothing is
    unpacked); an interrupted download resumes when run again. A variant fetches its base.
    """
    from lab.fetch import archive_for, fetch

    settings = FetchSettings(**given(flags))
    folder = fetch(name, settings, force=force, say=click.echo)
    archive = archive_for(name)
    click.echo(f"\n{archive.licence}\nCite: {archive.citation}\nMore: {archive.homepage}")
    click.echo(f"\n{name} is ready in {folder} (provenance: PROVENANCE.json there).")


@data_group.command("list")
def list_cmd() -> None:
    """Show each known dataset, whether it is in the data directory and whether it verifies."""
    from lab.fetch import archive_for, provenance, verify_folder

    data_dir = FetchSettings().data_dir
    click.echo(f"data directory: {data_dir} (RECSTREAM_DATA_DIR)")
    for name in _NAMED:
        archive = archive_for(name)
        folder = data_dir / archive.name
        if not folder.is_dir():
            state = f"missing: `recstream data fetch {name}`"
        else:
            problems = verify_folder(folder, archive)
            origin = "fetched" if provenance(folder) else "present"
            state = f"{origin}, verified" if not problems else f"does NOT verify: {problems[0]}"
        click.echo(f"{name:26} {state}")


def register(main: click.Group, serve: click.Group) -> None:
    """Add this package's commands to the `recstream` command line."""
    main.add_command(train_cmd)
    main.add_command(eval_cmd)
    main.add_command(artifact_group)
    main.add_command(data_group)
