"""How faithful and how cheap the reasons of recommended items are, on a served artifact.

For test users of the artifact's dataset (time-ordered leave-one-out, DESIGN.md) the script
takes each user's top 10 from the served model and, for every listed item, one history item
named by each method:

* ``weights``: the first of ``ArtifactRecommender.explain`` (the fusion's collaborative shares,
  what every published list carries);
* ``occlusion``: the first of ``inference.reasons.occlusion_reasons`` (the item whose removal
  costs the most score; conversation replies);
* ``newest``: the user's newest history item (a reason anyone could give without a model);
* ``random``: a random history item.

It removes that one item from the history, ranks again with the served model and reports how far
the listed item falls: mean and median places, and the share that leave the top 10. A faithful
reason is one the model's list really depends on. It also reports the time per list of each
method, p50 and p99, and how often ``weights`` names the same first reason as ``occlusion``.

Run from the repository root, with the key that verifies the artifact:
``RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=... nice python -m bench.reasons --artifact artifacts/ml-100k``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from bench.common import percentile
from inference.artifact import load_recommender
from inference.reasons import occlusion_reasons
from lab.datasets import load_dataset
from lab.protocol import leave_one_out
from recstream.settings import CommonSettings

K = 10
DEPTH = 2000  # ranks below this count as this deep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", required=True, help="folder written by `recstream train`")
    parser.add_argument("--dataset", default=None, help="dataset (default: the artifact's)")
    parser.add_argument("--users", type=int, default=100, help="test users sampled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    rec = load_recommender(args.artifact)
    split = leave_one_out(load_dataset(args.dataset or rec.dataset, CommonSettings().data_dir))
    rng = np.random.default_rng(args.seed)
    histories = [h for h in split.histories("test") if len(h) >= 2]
    picked = rng.choice(len(histories), min(args.users, len(histories)), replace=False)
    print(f"{rec.name} ({rec.version}), {len(picked)} test users of {split.dataset}")

    def rank(history: list[str], item: str) -> int:
        ranked = [i for i, _ in rec.recommend([history], DEPTH)[0]]
        return ranked.index(item) if item in ranked else DEPTH

    methods: dict[str, Callable[[list[str], list[str]], dict[str, list[str]]]] = {
        "weights": rec.explain,
        "occlusion": lambda history, items: occlusion_reasons(rec, history, items),
        "newest": lambda history, items: {i: [history[-1]] for i in items},
        "random": lambda history, items: {
            i: [history[int(rng.integers(len(history)))]] for i in items
        },
    }
    drops: dict[str, list[tuple[int, int]]] = {name: [] for name in methods}
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    same = explained = listed = 0
    for row in picked:
        history = [split.item_ids[i] for i in histories[row]]
        items = [i for i, _ in rec.recommend([history], K)[0]]
        firsts: dict[str, dict[str, str]] = {}
        for name, method in methods.items():
            started = time.perf_counter()
            reasons = method(history, items)
            seconds[name].append(time.perf_counter() - started)
            firsts[name] = {i: r[0] for i, r in reasons.items() if r}
        listed += len(items)
        explained += len(firsts["weights"])
        same += sum(firsts["weights"].get(i) == r for i, r in firsts["occlusion"].items())
        for item in items:
            before = items.index(item)
            for name in methods:
                removed = firsts[name].get(item)
                if removed is not None:
                    after = rank([h for h in history if h != removed], item)
                    drops[name].append((before, after))

    print(f"weights explain {explained} of {listed} listed items; same first reason as occlusion")
    print(f"for {same / max(explained, 1):.1%} of them\n")
    print(
        "| reason removed | items | places lost, mean | median | leave the top 10 | ms per list |"
    )
    print("|---|---|---|---|---|---|")
    for name, pairs in drops.items():
        d = np.asarray(pairs)
        lost = d[:, 1] - d[:, 0]
        ms = [s * 1000 for s in seconds[name]]
        print(
            f"| {name} | {len(d)} | {lost.mean():.1f} | {np.median(lost):.0f} | "
            f"{np.mean(d[:, 1] >= K):.1%} | p50 {percentile(ms, 0.5):.1f}, "
            f"p99 {percentile(ms, 0.99):.1f} |"
        )


if __name__ == "__main__":
    main()
