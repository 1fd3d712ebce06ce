"""How loud recent popularity is against the model, on one dataset's newcomers.

Artifacts trained before the ``"top"`` scale serve ``z(model) + weight * z(log(1 + count))``
(:func:`inference.trending.blend_recent`, scale ``"z"``), each part standardised over the whole
catalog. Where few items were taken up in the window (a sparse dataset, a short window), the
counts' z-scores of those few items are far larger than the model's best, so one weight means a
much stronger blend on one dataset than on another: why the counts are now divided by the
window's largest instead (scale ``"top"``, 0 to 1 on any catalog). For each window of
:data:`DAYS` days before each test user's first item (the cold-start moment; nothing of the
user's own), this prints the median number of items counted, the share of empty windows, and the
median of the highest and of the tenth highest z-score; with ``--artifact``, the same two
z-scores of the served model's scores for the one-item histories.

``RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=... nice python -m bench.trending_scale --dataset
ml-latest-small [--artifact <folder>] [--users 300]``
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.common import cold_start_data
from inference.hybrid import standardise

DAYS = (1, 7, 30)
BATCH = 128


def _tops(z: np.ndarray) -> tuple[float, float]:
    """Medians over the rows of the highest and the tenth highest value."""
    ordered = np.sort(z, axis=1)
    return float(np.median(ordered[:, -1])), float(np.median(ordered[:, -10]))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", maxsplit=1)[0])
    parser.add_argument("--dataset", required=True, help="dataset name or folder")
    parser.add_argument("--artifact", help="folder written by `recstream train` (optional)")
    parser.add_argument("--users", type=int, default=300, help="test users sampled (seed 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    split, recent = cold_start_data(args)
    hist, rows = split.prefix_histories("test", 1)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(rows), size=min(args.users, len(rows)), replace=False))
    users = split.eval_users[rows][pick]
    print(f"{split.dataset}: {len(users)} test users at their first item, {split.n_items} items")
    print(f"{'window':>8} {'items counted':>14} {'empty':>6} {'top z':>7} {'10th z':>7}")
    for days in DAYS:
        scores = np.stack(
            [recent.scores(u, recent.times[u][0], days, inclusive=True) for u in users]
        )
        counted = (scores > 0).sum(axis=1)
        kept = counted > 0  # an empty window blends nothing
        top, tenth = _tops(standardise(scores[kept])) if kept.any() else (0.0, 0.0)
        print(
            f"{days:>6} d {np.median(counted):>14.0f} {1 - kept.mean():>6.1%} "
            f"{top:>7.2f} {tenth:>7.2f}"
        )
    if args.artifact:
        from inference.artifact import load_recommender

        model = load_recommender(args.artifact, retrieval=False)
        if model.item_ids != split.item_ids:
            raise SystemExit(f"artifact {args.artifact} was not trained on {split.dataset}")
        few = [hist[i] for i in pick]
        base = np.concatenate(
            [model.model_score(few[s : s + BATCH]) for s in range(0, len(few), BATCH)]
        )
        top, tenth = _tops(standardise(base))
        print(f"{'model':>8} {'':>14} {'':>6} {top:>7.2f} {tenth:>7.2f}")


if __name__ == "__main__":
    main()
