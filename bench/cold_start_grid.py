"""Cold start: every blend of text retrieval and popularity into the model, on validation and test.

For each user's first 1, 2 and 3 training items (``Split.prefix_histories``, the protocol of
``recstream eval --cold-start``), the artifact's model scores (without its own retrieval) are
standardised and blended with ``w_r * z(text retrieval) + w_p * z(log popularity)`` for a grid of
weights; the script prints, per weight pair, the relative NDCG@10 change against the model alone
on each validation and test prefix. It shows whether any blend that validation could choose
reaches a goal on test, and how far validation and test agree.

A second table does the same for recent popularity, the signal a live system has and the models
lack: ``z(log(1 + other users' interactions with the item in the D days up to the user's last
prefix item))`` (nothing after that moment, nothing of the user's own), for D in
:data:`RECENT_DAYS`.

``RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=... nice python -m bench.cold_start_grid --dataset ml-100k
--artifact <folder>`` (an artifact with the item index, from ``recstream train``).
"""

from __future__ import annotations

import numpy as np

from bench.common import artifact_parser, cold_start_data
from inference.artifact import load_recommender, read_item_index
from inference.hybrid import standardise
from lab.protocol import ndcg_per_user, target_ranks

WEIGHTS = (0.0, 0.25, 0.5, 1.0)
RECENT_DAYS = (7, 30)
RECENT_WEIGHTS = (0.5, 1.0, 2.0)
PREFIXES = (1, 2, 3)
BATCH = 128


def main() -> None:
    parser = artifact_parser(__doc__ or "")
    args = parser.parse_args()

    split, recent = cold_start_data(args)
    model = load_recommender(args.artifact, retrieval=False)
    vectors = read_item_index(args.artifact).vectors(split.item_ids)
    counts = np.zeros(split.n_items)
    for history in split.train:
        np.add.at(counts, history, 1.0)
    ndcg: dict[tuple[str, int, float, float], float] = {}
    popular: dict[tuple[str, int], float] = {}  # popularity alone
    trending: dict[tuple[str, int, int, float], float] = {}  # (stage, n, days, weight)
    for stage in ("valid", "test"):
        for n in PREFIXES:
            hist, rows = split.prefix_histories(stage, n)
            targets = split.targets(stage)[rows]
            base = standardise(
                np.concatenate(
                    [model.model_score(hist[s : s + BATCH]) for s in range(0, len(hist), BATCH)]
                )
            )
            query = np.stack([vectors[h].mean(axis=0) for h in hist])
            query /= np.linalg.norm(query, axis=1, keepdims=True)
            text = standardise(query @ vectors.T)
            pop = standardise(np.tile(np.log1p(counts), (len(hist), 1)))
            for w_r in WEIGHTS:
                for w_p in WEIGHTS:
                    ranks = target_ranks(base + w_r * text + w_p * pop, hist, targets)
                    ndcg[stage, n, w_r, w_p] = float(ndcg_per_user(ranks).mean())
            popular[stage, n] = float(ndcg_per_user(target_ranks(pop, hist, targets)).mean())
            users = split.eval_users[rows]
            for days in RECENT_DAYS:
                fresh = standardise(
                    np.stack(
                        [
                            recent.scores(u, recent.times[u][n - 1], days, inclusive=True)
                            for u in users
                        ]
                    )
                )
                for w in RECENT_WEIGHTS:
                    ranks = target_ranks(base + w * fresh, hist, targets)
                    trending[stage, n, days, w] = float(ndcg_per_user(ranks).mean())

    def change(stage: str, n: int, w_r: float, w_p: float) -> float:
        return ndcg[stage, n, w_r, w_p] / max(ndcg[stage, n, 0.0, 0.0], 1e-12) - 1.0

    print(f"{model.name} ({model.version}) on {split.dataset}: NDCG@10 of the model alone")
    for stage in ("valid", "test"):
        print(
            f"  {stage}: "
            + ", ".join(f"first {n} {ndcg[stage, n, 0.0, 0.0]:.4f}" for n in PREFIXES)
        )
    print("popularity alone")
    for stage in ("valid", "test"):
        print(f"  {stage}: " + ", ".join(f"first {n} {popular[stage, n]:.4f}" for n in PREFIXES))
    print("\n| retrieval | popularity | valid 1 / 2 / 3 | valid mean | test 1 / 2 / 3 |")
    print("|---|---|---|---|---|")
    for w_r in WEIGHTS:
        for w_p in WEIGHTS:
            valid = [change("valid", n, w_r, w_p) for n in PREFIXES]
            test = [change("test", n, w_r, w_p) for n in PREFIXES]
            print(
                f"| {w_r:g} | {w_p:g} | {' / '.join(f'{v:+.1%}' for v in valid)} | "
                f"{np.mean(valid):+.1%} | {' / '.join(f'{t:+.1%}' for t in test)} |"
            )
    print("\n| recent popularity | weight | valid 1 / 2 / 3 | valid mean | test 1 / 2 / 3 |")
    print("|---|---|---|---|---|")
    for days in RECENT_DAYS:
        for w in RECENT_WEIGHTS:
            valid, test = (
                [trending[stage, n, days, w] / ndcg[stage, n, 0.0, 0.0] - 1.0 for n in PREFIXES]
                for stage in ("valid", "test")
            )
            print(
                f"| {days} days | {w:g} | {' / '.join(f'{v:+.1%}' for v in valid)} | "
                f"{np.mean(valid):+.1%} | {' / '.join(f'{t:+.1%}' for t in test)} |"
            )


if __name__ == "__main__":
    main()
