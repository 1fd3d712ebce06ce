"""Small-shop subsamples of MovieLens in the generic dataset format, for the robustness table.

``python -m bench.small_shops --out /tmp/shops`` writes one folder per shop (``interactions.csv``
and ``items.csv`` with title, genres and tags, as a user would bring them), each a random set of
users of a MovieLens dataset with only their most recent 4-20 interactions: few users, short
histories, the case no preset was tuned for. ``recstream train`` / ``recstream eval`` then read
the folder by path (``--dataset /tmp/shops/mls-300``). Deterministic for a seed; the data stays
under the data directory setting's datasets, only the subsample is written.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from lab.datasets import Dataset, load_dataset
from recstream.settings import CommonSettings

# name -> (source dataset, users); histories cut to their last 4..20 interactions.
SHOPS = {
    "mls-300": ("ml-latest-small", 300),
    "mls-610": ("ml-latest-small", 610),
    "ml100k-500": ("ml-100k", 500),
}
SHORTEST, LONGEST = 4, 20


def subsample(ds: Dataset, users: int, seed: int) -> list[tuple[str, str, float]]:
    """``(user, item, timestamp)`` of ``users`` random users' last 4-20 interactions each."""
    rng = np.random.default_rng(seed)
    histories = ds.histories()
    ids = sorted(histories)
    chosen = rng.choice(len(ids), size=min(users, len(ids)), replace=False)
    rows = []
    for u in sorted(chosen.tolist()):
        keep = int(rng.integers(SHORTEST, LONGEST + 1))
        for it in histories[ids[u]][-keep:]:
            rows.append((it.user_id, it.item_id, it.ts))
    return rows


def write_shop(folder: Path, ds: Dataset, rows: list[tuple[str, str, float]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "interactions.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "item_id", "timestamp"])
        writer.writerows((u, i, int(ts)) for u, i, ts in rows)
    used = sorted({i for _, i, _ in rows})
    with (folder / "items.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["item_id", "title", "categories", "description"])
        for item_id in used:
            item = ds.items.get(item_id)
            if item is None:
                writer.writerow([item_id, item_id, "", ""])
                continue
            writer.writerow([item_id, item.title, "|".join(item.categories), item.description])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder for the shops.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data_dir = CommonSettings().data_dir
    sources: dict[str, Dataset] = {}
    for name, (source, users) in SHOPS.items():
        ds = sources.setdefault(source, load_dataset(source, data_dir))
        rows = subsample(ds, users, args.seed)
        write_shop(args.out / name, ds, rows)
        n_users = len({u for u, _, _ in rows})
        n_items = len({i for _, i, _ in rows})
        print(f"{args.out / name}: {n_users} users, {n_items} items, {len(rows)} interactions")


if __name__ == "__main__":
    main()
