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
   every other user's items (held-out ones too) on the window's whole days up to the prefix's
   last item, and the user's own prefix (``bench.cold_start_served.served_counts``). It
   judges the next item and the next three with NDCG@10 and the paired Wilcoxon test, and, as
   ``recstream eval --cold-start`` does, the user's last item with the counts up to its own
   moment (the user's items past the prefix left out of them).

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

from bench.cold_start_served import served_counts
from bench.small_shops import write_shop
from lab.datasets import Dataset, load_dataset
from lab.protocol import leave_one_out, ndcg_per_user, significance, target_ranks
from lab.trending import DAYS, PREFIXES, SCALE, WEIGHTS, RecentPopularity
from recstream.settings import CommonSettings

NEXT = 3  # the items after the prefix that are judged


def held_out(ds: Dataset, share: float, seed: int) -> set[str]:
    """The users held out: a seeded random ``share`` of them."""
    users = sorted(ds.histories())
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(users), size=round(share * len(users)), replace=False)
    return {users[i] for i in picked}


def judge(scores: np.ndarray, prefix: np.ndarray, targets: list[int | None]) -> np.ndarray:
    """NDCG@10 of each target among the unseen items (0 for one the artifact does not know)."""
    known = [t for t in targets if t is not None]
    ranks = iter(target_ranks(np.repeat(scores, len(known), axis=0), [prefix] * len(known), known))
    return np.asarray([0.0 if t is None else ndcg_per_user(next(ranks)) for t in targets])


def measure(ds: Dataset, users: set[str], artifact: Path) -> None:
    from inference.artifact import load_recommender
    from inference.trending import blend_recent, recent_counts, recent_feature

    model = load_recommender(artifact)
    trend = model.trending
    served_blend = (
        f"recent popularity {trend.days} days, weight {trend.weight:g} on scale {trend.scale!r}, "
        f"histories under {trend.below} items"
        + (
            f" (served to users away {trend.idle_s} s or more; judged here on every list, as "
            "if they were: bench/cold_start_served.py judges it as served)"
            if trend.idle_s
            else ""
        )
        if trend.active
        else "no recent popularity (its training found no blend; the lab's grid is judged)"
    )
    print(
        f"{ds.name}: {len(users)} held-out users; {model.name} ({model.version}, "
        f"{model.precision}) trained without them: {served_blend}"
    )
    split = leave_one_out(ds)  # the lab's view of every user, to count windows as served
    recent = RecentPopularity(ds, split)
    position = {u: i for i, u in enumerate(split.user_ids)}
    histories = ds.histories()
    # The artifact's own blend on its scale, and the lab's grid on the lab's.
    served = (trend.days, trend.weight, trend.scale)
    grid = {(int(d), w, SCALE) for d in DAYS for w in WEIGHTS}
    blends = sorted(grid | {served} if trend.active else grid)
    # Per prefix: NDCG@10 of the next items and the last item per user, before and per blend.
    before: dict[int, list[np.ndarray]] = {n: [] for n in PREFIXES}
    after: dict[tuple[int, int, float, str], list[np.ndarray]] = {}
    for n in PREFIXES:
        for user in sorted(users):
            seq, u = histories[user], position.get(user)
            if u is None or len(seq) < n + NEXT + 1:
                continue
            prefix = model.to_indices([it.item_id for it in seq[:n]])
            if len(prefix) < n:  # an item the artifact never saw: not this protocol's case
                continue
            nexts = [model.index.get(it.item_id) for it in seq[n : n + NEXT]]
            last = [model.index.get(seq[-1].item_id)]
            model.use_recent(None)
            plain = model.score([prefix])  # what was served without the counts
            before[n].append(np.concatenate([judge(plain, prefix, t) for t in (nexts, last)]))
            own = model.model_score([prefix])  # what the blend adds the counts to
            for days in sorted({d for d, _, _ in blends}):
                windows = [
                    np.log1p(recent_counts(held, model.index, model.n_items))[None, :]
                    for held in (
                        served_counts(recent, split, u, n, moment=at, days=days)
                        for at in (seq[n - 1].ts, seq[-1].ts - 1e-3)
                    )
                ]
                here = [(w, c) for d, w, c in blends if d == days]
                scaled = {c: [recent_feature(w, c) for w in windows] for _, c in here}
                for weight, scale in here:
                    judged = [
                        judge(blend_recent(own, feature, weight), prefix, targets)
                        for feature, targets in zip(scaled[scale], (nexts, last), strict=True)
                    ]
                    after.setdefault((n, days, weight, scale), []).append(np.concatenate(judged))
    picks = {"next item": slice(0, 1), "next three": slice(0, NEXT), "last item": slice(NEXT, None)}

    def change(
        n: int, days: int, weight: float, scale: str, pick: slice
    ) -> tuple[float, float, float]:
        b = np.asarray([row[pick].mean() for row in before[n]])
        a = np.asarray([row[pick].mean() for row in after[(n, days, weight, scale)]])
        gain = a.mean() / b.mean() - 1 if b.mean() else float("nan")
        return b.mean(), gain, significance(a, b)["wilcoxon_p"]

    if trend.active:
        print(
            f"\nThe served blend ({served[0]} days, weight {served[1]:g}, scale {served[2]!r}): "
            "NDCG@10 without the counts (what was served before), change with them, paired "
            "Wilcoxon p"
        )
        head = " | ".join(f"{k}: before | change | p" for k in picks)
        print(f"\n| history | users | {head} |")
        print("|---" * (2 + 3 * len(picks)) + "|")
        for n in PREFIXES:
            cells = [change(n, *served, pick) for pick in picks.values()]
            text = " | ".join(f"{b:.4f} | {g:+.1%} | {p:.2g}" for b, g, p in cells)
            print(f"| first {n} | {len(before[n])} | {text} |")
    print("\nThe served blend and the lab's grid: change on the first 1 / 2 / 3 items")
    print("\n| days | weight | scale | " + " | ".join(picks) + " |")
    print("|---" * (3 + len(picks)) + "|")
    for days, weight, scale in blends:
        cells = [
            " / ".join(f"{change(n, days, weight, scale, pick)[1]:+.1%}" for n in PREFIXES)
            for pick in picks.values()
        ]
        print(f"| {days} | {weight:g} | {scale} | {' | '.join(cells)} |")


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
