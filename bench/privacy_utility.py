"""What differential privacy costs: nearest-neighbour recommendations from clean vs noised profiles.

The embeddings publisher (``consumers.embeddings``) releases each user's profile embedding with
the Gaussian mechanism of ``inference.privacy`` (user-level replace-one, sensitivity 2C, analytic
calibration). This script measures what a consumer of those vectors loses. On a dataset's
time-ordered leave-one-out split (``lab.protocol``; DESIGN.md's protocol), each evaluated user's
profile is the recency-weighted mean of the MiniLM vectors of their history (train + validation
item; weight 0.9^age, newest first, like the decayed weights of a stored profile), and the
catalog is ranked by inner product with it, seen items masked:

* ``clean``: the profile embedding itself (what a trusted service would use);
* ``ε = …``: one release of the mechanism (δ = 1e-5, C = 1), median over ``--seeds`` draws;
* ``random``: a random ranking (the floor).

Per row: NDCG@10 and HR@10 of the test item, and the cosine between the mean of all users'
released vectors and the mean of their clean ones (what an aggregate analysis can still see).

Run from the repository root: ``nice python -m bench.privacy_utility --dataset ml-100k``.
The seeded generator only makes the table reproducible: its draws have the same distribution as
the service's CSPRNG noise.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from inference.embeddings import catalog_vectors
from inference.privacy import GaussianMechanism
from lab.datasets import load_dataset
from lab.protocol import leave_one_out, metrics_from_ranks, target_ranks
from recstream.settings import CommonSettings

METRICS = ("ndcg@10", "hr@10", "cos")
RANDOM_SEEDS = 10_000


def profiles(vectors: np.ndarray, histories: list[np.ndarray], decay: float) -> np.ndarray:
    """Unit-length recency-weighted mean of each history's item vectors."""
    out = np.zeros((len(histories), vectors.shape[1]), dtype=np.float64)
    for row, hist in enumerate(histories):
        weights = decay ** np.arange(len(hist))[::-1]  # newest item weight 1
        mean = weights @ vectors[hist].astype(np.float64)
        out[row] = mean / max(float(np.linalg.norm(mean)), 1e-12)
    return out


def evaluate(
    queries: np.ndarray, vectors: np.ndarray, histories: list[np.ndarray], targets: np.ndarray
) -> dict[str, float]:
    ranks = target_ranks(queries @ vectors.T.astype(np.float64), histories, targets)
    return metrics_from_ranks(ranks)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--epsilons", default="0.5,1,2,4,8", help="Comma-separated ε values.")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--decay", type=float, default=0.9, help="Recency weight per step back.")
    args = parser.parse_args()

    started = time.perf_counter()
    ds = load_dataset(args.dataset, CommonSettings().data_dir)
    split = leave_one_out(ds)
    vectors = catalog_vectors(split.item_ids, split.items)
    histories, targets = split.histories("test"), split.targets("test")
    clean = profiles(vectors, histories, args.decay)
    print(
        f"{args.dataset}: {len(histories)} users, {split.n_items} items, MiniLM {vectors.shape[1]}"
        f"-d, profiles {args.decay}^age; {time.perf_counter() - started:.0f} s to embed"
    )
    print(f"{'profile':<16} {'sigma':>6} {'NDCG@10':>8} {'HR@10':>7} {'cos(mean)':>10}")
    base = evaluate(clean, vectors, histories, targets)
    print(f"{'clean':<16} {'-':>6} {base['ndcg@10']:8.4f} {base['hr@10']:7.4f} {1.0:10.3f}")
    for epsilon in [float(e) for e in args.epsilons.split(",")]:
        mech = GaussianMechanism(epsilon, args.delta, args.clip_norm)
        runs = []
        for seed in range(args.seeds):
            noised = mech.privatize(clean, insecure_rng_for_tests=np.random.default_rng(seed))
            got = evaluate(noised.astype(np.float64), vectors, histories, targets)
            got["cos"] = cosine(noised.mean(axis=0), clean.mean(axis=0))
            runs.append(got)
        ndcg, hr, cos = (float(np.median([r[m] for r in runs])) for m in METRICS)
        print(f"{f'ε = {epsilon:g}':<16} {mech.sigma:6.2f} {ndcg:8.4f} {hr:7.4f} {cos:10.3f}")
    # Seeds of their own: the noise draws above would otherwise be this very ranking scaled.
    rand = [
        evaluate(
            np.random.default_rng(RANDOM_SEEDS + s).standard_normal(clean.shape),
            vectors,
            histories,
            targets,
        )
        for s in range(args.seeds)
    ]
    ndcg, hr = (float(np.median([r[m] for r in rand])) for m in ("ndcg@10", "hr@10"))
    print(f"{'random':<16} {'-':>6} {ndcg:8.4f} {hr:7.4f} {'-':>10}")
    print(f"median of {args.seeds} seeds; δ = {args.delta:g}, C = {args.clip_norm:g} (Δ = 2C)")


if __name__ == "__main__":
    main()
