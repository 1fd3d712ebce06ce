"""CPU inference speed of a served artifact: fp32 against INT8 dynamic quantization.

The artifact serves the gen+ease hybrid when it carries one (``--no-hybrid``: the transformer
alone), the transformer alone otherwise.

Measures, on real histories of the artifact's dataset (test-time inputs, up to ``max_len`` items):
- batched throughput in users/s (``--batch`` users per call, the worker pool's batch path);
- single-user latency p50/p99 in ms (one request at a time, the streaming path),
each through ``ArtifactRecommender.recommend`` (item ids in, top-10 catalog items out).

    nice python -m bench.model_inference --artifact artifacts/ml-100k-s0 [--batch 64] [--users 500]
        [--no-hybrid]

(``-m`` from the repository root, so this file does not shadow the ``inference`` package.)

Without ``--artifact``, ``--dataset`` builds an untrained model of the dataset's preset size:
speed does not depend on the weights, quality does (use ``recstream eval`` for that).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _histories(dataset: str, users: int) -> list[list[str]]:
    from lab.datasets import load_dataset
    from lab.protocol import leave_one_out
    from recstream.settings import CommonSettings

    split = leave_one_out(load_dataset(dataset, CommonSettings().data_dir))
    hist = split.histories("test")[:users]
    return [[split.item_ids[i] for i in h] for h in hist]


def _untrained_artifact(dataset: str, folder: Path) -> Path:
    from inference.generative import GenConfig, ItemTransformer
    from lab.artifact import save_artifact
    from lab.datasets import load_dataset
    from lab.evaluate import gen_preset
    from lab.protocol import leave_one_out
    from recstream.settings import CommonSettings

    split = leave_one_out(load_dataset(dataset, CommonSettings().data_dir))
    cfg = GenConfig(n_items=split.n_items, **gen_preset(split.dataset))
    save_artifact(folder, ItemTransformer(cfg), split, {"note": "untrained, for timing only"})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, help="Artifact folder from `recstream train`.")
    parser.add_argument("--dataset", default="ml-100k", help="Dataset when no artifact is given.")
    parser.add_argument("--batch", type=int, default=64, help="Users per batched call.")
    parser.add_argument("--users", type=int, default=500, help="Users to time.")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads.")
    parser.add_argument(
        "--no-hybrid",
        dest="hybrid",
        action="store_false",
        help="Serve the transformer alone even when the artifact carries the gen+ease hybrid.",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from inference.artifact import load_recommender
    from inference.settings import ArtifactTrust

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.artifact or _untrained_artifact(args.dataset, Path(tmp) / "gen")
        # The bench's own untrained artifact is unsigned unless a signing key is configured.
        trust = ArtifactTrust(allow_unsigned=args.artifact is None)
        models = {
            name: load_recommender(
                folder, device="cpu", quantize=quantize, hybrid=args.hybrid, trust=trust
            )
            for name, quantize in (("fp32", False), ("int8", True))
        }
    first = next(iter(models.values()))
    histories = _histories(first.dataset, args.users)
    print(
        f"artifact {first.version}  model {first.name}  dataset {first.dataset}  "
        f"users {len(histories)}  "
        f"batch {args.batch}  threads {args.threads}  max_len {first.scorer.cfg.max_len}"
    )
    print(f"{'precision':<10}{'users/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'top-10 agree':>14}")
    tops: dict[str, list[list[str]]] = {}
    for name, rec in models.items():
        rec.recommend(histories[: args.batch], 10)  # warm-up
        t0 = time.perf_counter()
        out = []
        for s in range(0, len(histories), args.batch):
            out += rec.recommend(histories[s : s + args.batch], 10)
        throughput = len(histories) / (time.perf_counter() - t0)
        tops[name] = [[i for i, _ in r] for r in out]
        timings = []
        for h in histories:
            t1 = time.perf_counter()
            rec.recommend([h], 10)
            timings.append((time.perf_counter() - t1) * 1000)
        agree = np.mean(
            [len(set(a) & set(b)) / 10 for a, b in zip(tops["fp32"], tops[name], strict=True)]
        )
        p50, p99 = np.percentile(timings, [50, 99])
        print(f"{name:<10}{throughput:>10.0f}{p50:>10.2f}{p99:>10.2f}{agree:>14.3f}")


if __name__ == "__main__":
    main()
