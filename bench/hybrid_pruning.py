"""What serving the gen+ease hybrid from an artifact costs in quality: pruning and INT8.

The artifact stores EASE's item-item weights pruned to the largest ``top_k`` per item. This script
scores the test split (full catalog, seen items masked) with
- the in-memory ``Hybrid``: dense EASE refitted with the artifact's parameters and the artifact's
  transformer in fp32, mixed with the artifact's alpha (what ``recstream eval`` measures);
- the served artifact (``ArtifactRecommender.score``) with the transformer in fp32 and in INT8;
- the same in-memory hybrid with EASE pruned to each ``--top-k`` (no retraining needed),
and prints HR@10, NDCG@10 and the top-10 overlap with the in-memory hybrid.

    nice python -m bench.hybrid_pruning --artifact /tmp/g-art --threads 1
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch


def _score_all(
    score: Callable[[Sequence[np.ndarray]], np.ndarray], histories: list[np.ndarray]
) -> np.ndarray:
    """Test-split scores in batches of 256 users (each row is the whole catalog)."""
    return np.concatenate([score(histories[s : s + 256]) for s in range(0, len(histories), 256)])


def _top10(scores: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
    from inference.scoring import top_k_unseen

    top, _ = top_k_unseen(scores.copy(), histories, 10)
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="A gen+ease artifact.")
    parser.add_argument(
        "--top-k", default="32,64,128,256,512", help="Comma-separated pruning levels to sweep."
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from inference.artifact import load_recommender
    from inference.scoring import EaseScorer
    from lab.baselines import EASE
    from lab.datasets import load_dataset
    from lab.hybrid import Hybrid
    from lab.protocol import leave_one_out, metrics_from_ranks, target_ranks
    from recstream.settings import CommonSettings

    fp32 = load_recommender(args.artifact, device="cpu", quantize=False)
    int8 = load_recommender(args.artifact, device="cpu", quantize=True)
    if fp32.cf is None:
        raise SystemExit(f"{args.artifact} has no hybrid section (trained with --no-hybrid?)")

    section = json.loads((args.artifact / "config.json").read_text(encoding="utf-8"))["hybrid"]
    params = section["params"]
    split = leave_one_out(load_dataset(fp32.dataset, CommonSettings().data_dir))
    if split.item_ids != fp32.item_ids:
        raise SystemExit("the artifact's vocabulary differs from the dataset's")
    hist, targets = split.histories("test"), split.targets("test")

    dense = EASE(**params).fit(split)
    reference = Hybrid(dense, fp32.scorer, fp32.alpha)
    ref_scores = _score_all(reference.score, hist)
    ref_top = _top10(ref_scores, hist)

    def row(label: str, scores: np.ndarray) -> None:
        m = metrics_from_ranks(target_ranks(scores, hist, targets))
        top = _top10(scores, hist)
        agree = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref_top, strict=True)])
        print(f"{label:<34}{m['hr@10']:>9.4f}{m['ndcg@10']:>10.4f}{agree:>14.3f}")

    print(
        f"artifact {fp32.version}  dataset {split.dataset}  test users {len(hist)}  "
        f"alpha {fp32.alpha}  stored top_k {section['top_k']}  EASE {params}"
    )
    print(f"{'scorer':<34}{'HR@10':>9}{'NDCG@10':>10}{'top-10 agree':>14}")
    row("in-memory Hybrid (dense EASE, fp32)", ref_scores)
    row(f"artifact top_k={section['top_k']} fp32", _score_all(fp32.score, hist))
    row(f"artifact top_k={section['top_k']} int8", _score_all(int8.score, hist))
    for k in (int(x) for x in args.top_k.split(",") if x.strip()):
        pruned = EaseScorer.from_arrays(dense.to_arrays(k), split.n_items, **params)
        mixed = Hybrid(pruned, fp32.scorer, fp32.alpha)
        row(f"in-memory, EASE top_k={k} fp32", _score_all(mixed.score, hist))
    size = (args.artifact / "cf.safetensors").stat().st_size
    dense_mb = dense.weights.nbytes / 1e6
    print(f"cf.safetensors {size / 1e6:.1f} MB (dense EASE weights {dense_mb:.1f} MB)")


if __name__ == "__main__":
    main()
