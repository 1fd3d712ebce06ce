"""Small helpers the benchmarks share, so each script prints figures computed the same way."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference.artifact import ArtifactRecommender
    from lab.protocol import Split
    from lab.trending import RecentPopularity

__all__ = ["artifact_parser", "cold_start_data", "percentile", "trending_artifact"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank rule; NaN when empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def artifact_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark that judges an artifact on its dataset: ``--dataset``,
    ``--artifact`` and ``--threads`` (its description: ``doc``'s first paragraph)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--dataset", required=True, help="dataset name or folder")
    parser.add_argument("--artifact", required=True, help="folder written by `recstream train`")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser


def cold_start_data(args: argparse.Namespace) -> tuple[Split, RecentPopularity]:
    """torch's threads from ``--threads``, then the leave-one-out split of ``--dataset`` and its
    recent popularity."""
    import torch

    from lab.datasets import load_dataset
    from lab.protocol import leave_one_out
    from lab.trending import RecentPopularity
    from recstream.settings import CommonSettings

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.dataset, CommonSettings().data_dir)
    split = leave_one_out(ds)
    return split, RecentPopularity(ds, split)


def trending_artifact(args: argparse.Namespace, split: Split) -> ArtifactRecommender:
    """``--artifact`` loaded as the workers load it, refused unless it was trained on ``split``'s
    dataset and blends recent popularity; prints what it serves."""
    from inference.artifact import load_recommender

    model = load_recommender(args.artifact)
    if model.item_ids != split.item_ids:
        raise SystemExit(f"artifact {args.artifact} was not trained on {split.dataset}")
    trend = model.trending
    if not trend.active:
        raise SystemExit(f"artifact {args.artifact} blends no recent popularity")
    print(
        f"{split.dataset}, {model.name} ({model.version}, {model.precision}): recent popularity "
        f"{trend.days} days, weight {trend.weight:g}, histories under {trend.below} items"
        + (f", users away {trend.idle_s} s or more; " if trend.idle_s else "; ")
        + f"retrieval weight {model.retrieval.weight:g} under {model.retrieval.max_history}"
    )
    return model
