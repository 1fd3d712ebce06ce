"""A synthetic shop in the generic dataset format, sized to time training on a large catalog.

``python -m bench.synthetic_catalog --out /tmp/synth-25k`` writes ``interactions.csv``
(``user_id,item_id,timestamp``) for 25,000 items and about 300,000 interactions, no ``items.csv``
(a shop with no item text). The data has what the models feed on, so timings are not measured
on noise:

- power-law popularity: item ``i`` (0-based rank) has weight ``(i + 10) ** -zipf``;
- taste: items fall into ``clusters`` groups and each user draws most items from one group;
- order: with probability ``p_next`` a user's next item is one of the previous item's three fixed
  "successors" (items often bought after it), which the transformer and the Markov term can learn.

History lengths are 3 + a geometric number (mean ``mean_len``), so every user reaches the
evaluation. Deterministic for a seed. Not a claim about any real shop: it is a timing fixture.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np


def generate(
    n_items: int = 25_000,
    n_interactions: int = 300_000,
    *,
    mean_len: float = 15.0,
    clusters: int = 50,
    zipf: float = 1.0,
    p_next: float = 0.4,
    p_cluster: float = 0.8,
    seed: int = 0,
) -> list[tuple[int, int, int]]:
    """``(user, item, timestamp)`` rows, in user order then time order."""
    rng = np.random.default_rng(seed)
    weight = (np.arange(n_items) + 10.0) ** -zipf
    # Item ids are shuffled against popularity rank, so id order says nothing.
    item_of_rank = rng.permutation(n_items)
    cluster = rng.integers(0, clusters, n_items)
    members = [np.flatnonzero(cluster == c) for c in range(clusters)]
    member_p = [weight[m] / weight[m].sum() for m in members]
    global_p = weight / weight.sum()
    successors = np.empty((n_items, 3), dtype=np.int64)
    for c, m in enumerate(members):
        successors[m] = rng.choice(m, size=(len(m), 3), p=member_p[c])
    rows: list[tuple[int, int, int]] = []
    user = 0
    t0 = 1_600_000_000
    while len(rows) < n_interactions:
        length = 3 + int(rng.geometric(1.0 / (mean_len - 2.0)))
        taste = int(rng.integers(0, clusters))
        start = t0 + int(rng.integers(0, 30 * 86_400))
        prev = -1
        seen: set[int] = set()
        for step in range(length):
            for _ in range(10):  # a few draws to avoid repeats; a repeat is allowed after that
                if prev >= 0 and rng.random() < p_next:
                    item = int(successors[prev, rng.integers(0, 3)])
                elif rng.random() < p_cluster:
                    item = int(rng.choice(members[taste], p=member_p[taste]))
                else:
                    item = int(rng.choice(n_items, p=global_p))
                if item not in seen:
                    break
            seen.add(item)
            rows.append((user, int(item_of_rank[item]), start + step * 3_600))
            prev = item
        user += 1
    return rows[:n_interactions] if len(rows) > n_interactions else rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder to write (created).")
    parser.add_argument("--items", type=int, default=25_000)
    parser.add_argument("--interactions", type=int, default=300_000)
    parser.add_argument("--mean-len", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = generate(args.items, args.interactions, mean_len=args.mean_len, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    with (args.out / "interactions.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["user_id", "item_id", "timestamp"])
        writer.writerows((f"u{u}", f"i{i}", ts) for u, i, ts in rows)
    users = len({u for u, _, _ in rows})
    items = len({i for _, i, _ in rows})
    print(f"{args.out}: {len(rows):,} interactions, {users:,} users, {items:,} items")


if __name__ == "__main__":
    main()
