"""How far each part of an artifact's model falls from validation to test, by history length.

The served fusion's weights are fitted on validation, so a part whose validation NDCG@10
overstates its test NDCG@10 more than the others' gets more weight than test would give it. For
the artifact's transformer and each collaborative part it carries (EASE, item-kNN), the script
prints NDCG@10 on the validation targets (history = training items) and on the test targets
(history = training items + the validation item), overall and for users with fewer than 50,
50-199 and at least 200 training items. ``--against <folder>`` adds the paired Wilcoxon test of
this artifact's transformer against that one's, on each stage.

``RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=... nice python -m bench.valid_test_gap --dataset
ml-latest-small-llamarec --artifact <folder>`` (an artifact from ``recstream train`` on that
dataset).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import numpy as np

from inference.artifact import load_recommender
from inference.scoring import CatalogScorer
from lab.datasets import load_dataset
from lab.protocol import leave_one_out, significance, stage_ndcg_per_user
from recstream.settings import CommonSettings

LENGTHS = ((0, 50), (50, 200), (200, None))
BATCH = 64
STAGES = ("valid", "test")


def bucket(lengths: np.ndarray, low: int, high: int | None) -> np.ndarray:
    """Which users have from ``low`` to below ``high`` training items (no upper bound: None)."""
    out: np.ndarray = (lengths >= low) & (lengths < (high or np.inf))
    return out


def row(name: str, valid: np.ndarray, test: np.ndarray, lengths: np.ndarray) -> str:
    cells = [
        f"{name:<8} {valid.mean():.4f} -> {test.mean():.4f} ({test.mean() / valid.mean() - 1:+.0%})"
    ]
    for low, high in LENGTHS:
        rows = bucket(lengths, low, high)
        cells.append(f"{valid[rows].mean():.4f} -> {test[rows].mean():.4f}")
    return " | ".join(cells)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="dataset name or folder")
    parser.add_argument("--artifact", required=True, help="folder written by `recstream train`")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--against", help="another artifact whose transformer to test against")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    split = leave_one_out(load_dataset(args.dataset, CommonSettings().data_dir))
    served = load_recommender(args.artifact, retrieval=False)
    if served.item_ids != split.item_ids:
        raise SystemExit(f"{args.artifact} was not trained on {split.dataset}")
    parts: dict[str, CatalogScorer] = {"gen": served.scorer, **served.parts}
    lengths = np.asarray([len(h) for h in split.histories("valid")])
    print(
        f"{served.name} ({served.version}) on {split.dataset}, {len(lengths)} users: "
        "NDCG@10 validation -> test"
    )
    head = " | ".join(
        ["part     all users"]
        + [f"{low}-{high - 1} items" if high else f">= {low} items" for low, high in LENGTHS]
    )
    counts = " | ".join(
        ["users"] + [str(int(bucket(lengths, low, high).sum())) for low, high in LENGTHS]
    )
    print(head)
    print(counts)
    judged = {
        name: {stage: stage_ndcg_per_user(part, split, stage, batch=BATCH) for stage in STAGES}
        for name, part in parts.items()
    }
    for name, ndcg in judged.items():
        print(row(name, ndcg["valid"], ndcg["test"], lengths))
    if args.against:
        other = load_recommender(args.against, retrieval=False).scorer
        for stage in STAGES:
            test = significance(
                judged["gen"][stage], stage_ndcg_per_user(other, split, stage, batch=BATCH)
            )
            print(
                f"gen against {args.against}, {stage}: mean difference {test['mean_diff']:+.4f}, "
                f"Wilcoxon p = {test['wilcoxon_p']:.2g}"
            )


if __name__ == "__main__":
    main()
