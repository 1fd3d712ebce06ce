"""Cold start as served, for users the model never saw: the artifact's scorer on held-out users.

``bench/cold_start_served.py`` measures the served blend of recent popularity on the protocol's
test users, whose sequences trained the transformer: its own transitions favour the model. A user
who signs up is in no training data. This script holds a share of the dataset's users out:

1. ``--write FOLDER`` writes the dataset without them in the generic format (``interactions.csv``
   and ``items.csv``); ``recstream train --dataset FOLDER`` then trains an artifact as usual (its
   presets apply when FOLDER is named like the dataset, e.g. ``.../ml-100k``).
2. ``--artifact ART`` gives each held-out user's first 1, 2 and 3 items to that artifact's served
   scorer (INT8, its fusion, retrieval and trending sections), without recent popularity (what
   was served before the blend) and with the counts the live system holds when the list is made:
   every user's items (held-out ones too; one per user and item) on the window's whole days up
   to the prefix's last item, the user's own prefix among them (``streams.trending``). It judges
   the next item, and the next three, with NDCG@10 and the paired Wilcoxon test.

The same seed and share pick the same users in both steps.

``python -m bench.cold_start_newcomers --dataset ml-100k --write /tmp/newcomers/ml-100k``, then
``recstream train --dataset /tmp/newcomers/ml-100k --out ART ...``, then
``RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=... nice python -m bench.cold_start_newcomers --dataset
ml-100k --artifact ART``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bench.small_shops import write_shop
from lab.datasets import Dataset, load_dataset
from lab.protocol import ndcg_per_user, significance, target_ranks
from lab.trending import PREFIXES
from recstream.settings import CommonSettings
from streams.trending import DAY_S, day_of

NEXT = 3  # the items after the prefix that are judged


def held_out(ds: Dataset, share: float, seed: int) -> set[str]:
    """The users held out: a seeded random ``share`` of them."""
    users = sorted(ds.histories())
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(users), size=round(share * len(users)), replace=False)
    return {users[i] for i in picked}


class Counts:
    """Everyone's items in time order, to count a window as the stream worker does."""

    def __init__(self, ds: Dataset) -> None:
        ordered = sorted(ds.interactions, key=lambda it: it.ts)
        self.ts = np.asarray([it.ts for it in ordered])
        self.items = [it.item_id for it in ordered]
        self.pairs = [(it.user_id, it.item_id) for it in ordered]

    def window(self, moment: float, days: int) -> dict[str, int]:
        """Users per item on the ``days`` whole UTC days ending on ``moment``'s day, up to it."""
        since = (day_of(moment) - days + 1) * DAY_S
        lo = int(np.searchsorted(self.ts, since, side="left"))
        hi = int(np.searchsorted(self.ts, moment, side="right"))
        counts: dict[str, int] = {}
        seen: set[tuple[str, str]] = set()
        for n in range(lo, hi):
            if self.pairs[n] not in seen:  # one per user and item, as the fold counts
                seen.add(self.pairs[n])
                counts[self.items[n]] = counts.get(self.items[n], 0) + 1
        return counts


def judge(scores: np.ndarray, prefix: np.ndarray, targets: list[int | None]) -> np.ndarray:
    """NDCG@10 of each target among the unseen items (0 for one the artifact does not know)."""
    known = [t for t in targets if t is not None]
    ranks = iter(target_ranks(np.repeat(scores, len(known), axis=0), [prefix] * len(known), known))
    return np.asarray([0.0 if t is None else ndcg_per_user(next(ranks)) for t in targets])


def measure(ds: Dataset, users: set[str], artifact: Path) -> None:
    from inference.artifact import load_recommender

    model = load_recommender(artifact)
    trend = model.trending
    if not trend.active:
        raise SystemExit(f"artifact {artifact} blends no recent popularity")
    print(
        f"{ds.name}: {len(users)} held-out users; {model.name} ({model.version}, "
        f"{model.precision}) trained without them: recent popularity {trend.days} days, weight "
        f"{trend.weight:g}, histories under {trend.below} items"
    )
    counts = Counts(ds)
    histories = ds.histories()
    print(
        "\n| history | users | next item: served before | with recent popularity | change | p "
        "| next three: served before | with | change | p |"
    )
    print("|---" * 10 + "|")
    for n in PREFIXES:
        rows: list[tuple[np.ndarray, np.ndarray]] = []  # NDCG@10 of the next items, before/after
        for user in sorted(users):
            seq = histories[user]
            if len(seq) < n + 1:
                continue
            prefix = model.to_indices([it.item_id for it in seq[:n]])
            if len(prefix) < n:  # an item the artifact never saw: not this protocol's case
                continue
            nexts = [model.index.get(it.item_id) for it in seq[n : n + NEXT]]
            model.use_recent(None)
            before = model.score([prefix])
            model.use_recent(counts.window(seq[n - 1].ts, trend.days))
            after = model.score([prefix])
            rows.append((judge(before, prefix, nexts), judge(after, prefix, nexts)))
        model.use_recent(None)
        cells = []
        for first_only in (True, False):
            before = np.asarray([b[0] if first_only else b.mean() for b, _ in rows])
            after = np.asarray([a[0] if first_only else a.mean() for _, a in rows])
            p = significance(after, before)["wilcoxon_p"]
            change = after.mean() / before.mean() - 1 if before.mean() else float("nan")
            cells.append(f"{before.mean():.4f} | {after.mean():.4f} | {change:+.1%} | {p:.2g}")
        print(f"| first {n} | {len(rows)} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", maxsplit=1)[0])
    parser.add_argument("--dataset", required=True, help="dataset name or folder")
    parser.add_argument("--share", type=float, default=0.2, help="share of users held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    step = parser.add_mutually_exclusive_group(required=True)
    step.add_argument("--write", type=Path, help="write the dataset without them here")
    step.add_argument("--artifact", type=Path, help="measure this artifact on them")
    args = parser.parse_args()
    ds = load_dataset(args.dataset, CommonSettings().data_dir)
    users = held_out(ds, args.share, args.seed)
    if args.write is not None:
        rows = [
            (it.user_id, it.item_id, it.ts) for it in ds.interactions if it.user_id not in users
        ]
        write_shop(args.write, ds, rows)
        print(f"{args.write}: {len(ds.histories()) - len(users)} users, {len(rows)} interactions")
        return
    import torch

    torch.set_num_threads(args.threads)
    measure(ds, users, args.artifact)


if __name__ == "__main__":
    main()
