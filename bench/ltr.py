"""Learning-to-rank fusion (``lab.ltr``) against the weighted fusion and the best single model.

For each ``--run DATASET[=ARTIFACT]`` (the artifact's transformer, INT8, joins EASE, item-kNN and
popularity tuned here on validation, as ``recstream eval``'s ``fused`` row does; without an
artifact the parts are the three baselines): candidates and features on the validation users;
a 5-fold user-level cross-validation of the best single part, the weighted fusion
(``lab.hybrid.Fusion``'s search) and the LambdaRank ranker, repeated ``--repeats`` times with
other folds (the final ranker's rounds are the median of the folds' early stops); the choice
rule (``lab.ltr.choose``) on the mean; then the test split: NDCG@10 of each, the paired Wilcoxon
test (``lab.evaluate.significance``) of the ranker and of the weighted fusion against the single
model chosen on validation, and the per-user serving latency of both fusions.

    RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=~/.cache/recstream/artifact-keys/artifact-signing.pub \\
    nice python -m bench.ltr --run ml-100k=/tmp/i14/ml100k-fused --out /tmp/ltr/ml-100k.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _parts(split: Any, artifact: Path | None) -> dict[str, Any]:
    from inference.artifact import load_recommender
    from lab.evaluate import baseline

    parts: dict[str, Any] = {}
    if artifact is not None:
        loaded = load_recommender(artifact, hybrid=False, retrieval=False)
        if loaded.item_ids != split.item_ids or loaded.manifest.get("training_data_sha256") != dict(
            split.sha256
        ):
            raise SystemExit(f"artifact {artifact} was not trained on {split.dataset}")
        parts["gen"] = loaded.scorer
    for name in ("ease", "itemknn", "pop"):
        parts[name] = baseline(name, split, say=lambda _: None, progress=False)
    return parts


def _ranker_latency(ltr: Any, histories: list[np.ndarray], users: int = 200) -> dict[str, float]:
    """Per-user milliseconds of candidates + features, and of the booster alone."""
    from lab.ltr import candidate_table, score_parts
    from lab.protocol import latency_summary

    features, booster, sizes = [], [], []
    for h in histories[:users]:
        scores, pair = score_parts(ltr.parts, [h], ltr.pair)
        t0 = time.perf_counter()
        table = candidate_table(scores, pair, [h], top_k=ltr.top_k, pair=ltr.pair).with_fusion(
            ltr.weights
        )
        t1 = time.perf_counter()
        ltr.booster.predict(table.features)
        t2 = time.perf_counter()
        features.append(t1 - t0)
        booster.append(t2 - t1)
        sizes.append(len(table.items))
    return {
        **{f"features_{k}": v for k, v in latency_summary(features).items()},
        **{f"booster_{k}": v for k, v in latency_summary(booster).items()},
        "candidates_mean": float(np.mean(sizes)),
    }


def run(dataset: str, artifact: Path | None, repeats: int = 3, say: Any = print) -> dict[str, Any]:
    from lab.datasets import load_dataset
    from lab.evaluate import evaluate, significance
    from lab.hybrid import Fusion
    from lab.ltr import fit_ltr
    from lab.protocol import leave_one_out
    from recstream.settings import CommonSettings

    started = time.perf_counter()
    split = leave_one_out(load_dataset(dataset, CommonSettings().data_dir))
    parts = _parts(split, artifact)
    fusion = Fusion(parts).fit(split)
    fit = fit_ltr(parts, split, fusion.weights, repeats=repeats)
    ltr, chosen, cv_means = fit.model, fit.chosen, fit.summary["cv_valid_ndcg@10"]
    singles = {n: v for n, v in fusion.valid_ndcg.items() if n != "fused"}
    single = max(singles, key=lambda n: singles[n])
    say(f"{split.dataset}: cv {cv_means} -> {chosen}")

    test: dict[str, Any] = {}
    per_user: dict[str, np.ndarray] = {}
    for name, part in parts.items():
        test[name], per_user[name] = evaluate(part, split, latency_users=0)
    test["fused"], per_user["fused"] = evaluate(fusion, split)
    test["ltr"], per_user["ltr"] = evaluate(ltr, split)
    served = {"single": single, "fused": "fused", "ltr": "ltr"}[chosen]
    test_best = max(parts, key=lambda n: test[n]["ndcg@10"])
    return {
        "dataset": split.dataset,
        "artifact": str(artifact) if artifact else None,
        "users": len(split.eval_users),
        "items": split.n_items,
        **fit.summary,
        "cv_ltr_vs_fused": significance(fit.cv_ndcg["ltr"], fit.cv_ndcg["fused"]),
        "cv_fused_vs_single": significance(fit.cv_ndcg["fused"], fit.cv_ndcg["single"]),
        "in_sample_valid_ndcg@10": dict(fusion.valid_ndcg),
        "fusion_weights": dict(fusion.weights),
        "single_on_valid": single,
        "single_on_test": test_best,
        "test_ndcg@10": {n: float(r["ndcg@10"]) for n, r in test.items()},
        "ltr_vs_single": significance(per_user["ltr"], per_user[single]),
        "fused_vs_single": significance(per_user["fused"], per_user[single]),
        "ltr_vs_fused": significance(per_user["ltr"], per_user["fused"]),
        "served_vs_single": significance(per_user[served], per_user[single]),
        "ltr_vs_test_best_single": significance(per_user["ltr"], per_user[test_best]),
        "latency_ms": {
            "fused_p50": test["fused"].get("latency_ms_p50"),
            "fused_p99": test["fused"].get("latency_ms_p99"),
            "ltr_p50": test["ltr"].get("latency_ms_p50"),
            "ltr_p99": test["ltr"].get("latency_ms_p99"),
            **_ranker_latency(ltr, split.histories("test")),
        },
        "seconds": time.perf_counter() - started,
    }


def sweep(dataset: str, artifact: Path | None, say: Any = print) -> dict[str, Any]:
    """Cross-validated NDCG@10 of a few ranker settings (one 5-fold split, seed 0): how much
    the booster's settings move it against the weighted fusion and the best single part."""
    from lab.datasets import load_dataset
    from lab.hybrid import FUSION_CELLS, validation_sample
    from lab.ltr import LtrParams, candidate_table, cross_validate, score_parts, standardised
    from lab.protocol import leave_one_out
    from recstream.settings import CommonSettings

    settings = {
        "no margin": LtrParams(base_scale=0.0),
        "default": LtrParams(),
        "monotone": LtrParams(monotone=True),
        "4 leaves": LtrParams(num_leaves=4, min_data_in_leaf=200, learning_rate=0.02),
        "margin x3": LtrParams(base_scale=3.0),
        "xendcg": LtrParams(objective="rank_xendcg"),
        "binary": LtrParams(objective="binary"),
    }
    split = leave_one_out(load_dataset(dataset, CommonSettings().data_dir))
    parts = _parts(split, artifact)
    hist, targets = validation_sample(split, split.n_items, FUSION_CELLS)
    scores, pair = score_parts(parts, hist, "ease")
    cands = candidate_table(scores, pair, hist, targets, pair="ease")
    z = standardised(scores)
    out: dict[str, Any] = {"dataset": split.dataset}
    for name, params in settings.items():
        out[name] = cross_validate(z, cands, hist, targets, params=params).means()
        say(f"{Path(split.dataset).name} {name}: {out[name]}")
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Validation (cross-validated) and test NDCG@10, paired Wilcoxon p, per-user latency."""
    head = (
        f"{'dataset':<26}{'cv single':>10}{'cv fused':>10}{'cv ltr':>9}{'p cv l/f':>10}"
        f"{'chosen':>8}{'single (valid)':>16}{'fused':>8}{'ltr':>8}{'p ltr/1':>9}"
        f"{'p fus/1':>9}{'p ltr/f':>9}{'ms fus':>8}{'ms ltr':>8}{'ms gbm':>8}"
    )
    lines = [head]
    for r in rows:
        cv, t, ms = r["cv_valid_ndcg@10"], r["test_ndcg@10"], r["latency_ms"]
        single = f"{r['single_on_valid']} {t[r['single_on_valid']]:.4f}"
        lines.append(
            f"{Path(r['dataset']).name:<26}{cv['single']:>10.4f}{cv['fused']:>10.4f}"
            f"{cv['ltr']:>9.4f}{r['cv_ltr_vs_fused']['wilcoxon_p']:>10.3g}{r['chosen']:>8}"
            f"{single:>16}{t['fused']:>8.4f}{t['ltr']:>8.4f}"
            f"{r['ltr_vs_single']['wilcoxon_p']:>9.3g}{r['fused_vs_single']['wilcoxon_p']:>9.3g}"
            f"{r['ltr_vs_fused']['wilcoxon_p']:>9.3g}{ms['fused_p50']:>8.2f}{ms['ltr_p50']:>8.2f}"
            f"{ms['booster_latency_ms_p50']:>8.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        action="append",
        required=True,
        metavar="DATASET[=ARTIFACT]",
        help="A dataset (preset name or folder) and optionally an artifact trained on it.",
    )
    parser.add_argument("--out", type=Path, help="Write the rows as JSON here.")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    parser.add_argument(
        "--repeats", type=int, default=3, help="Cross-validations, each with other folds."
    )
    parser.add_argument(
        "--sweep", action="store_true", help="Cross-validate a few ranker settings instead."
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.run:
        dataset, _, artifact = spec.partition("=")
        path = Path(artifact) if artifact else None
        if args.sweep:
            rows.append(sweep(dataset, path))
            continue
        rows.append(run(dataset, path, args.repeats))
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(rows, indent=1, default=float), encoding="utf-8")
    if not args.sweep:
        print(table(rows))


if __name__ == "__main__":
    main()
