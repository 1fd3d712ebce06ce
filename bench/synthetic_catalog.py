"""A synthetic shop in the generic dataset format, sized to time training on a large catalog.

``python -m bench.synthetic_catalog --out /tmp/synth-25k --items 27500`` writes
``interactions.csv`` (``user_id,item_id,timestamp``) for about 25,000 items that occur and
300,000 interactions, no ``items.csv`` (a shop with no item text). The data has what the models
feed on, so timings are not measured on noise:

- power-law popularity: item ``i`` (0-based rank) has weight ``(i + 10) ** -zipf``;
- taste: items fall into ``clusters`` groups and each user draws most items from one group;
- order: with probability ``p_next`` a user's next item is one of the previous item's three fixed
  "successors" (items often bought after it), which the transformer and the Markov term can learn.

History lengths are 3 + a geometric number (mean ``mean_len``), so every user reaches the
evaluation. Deterministic for a seed. Not a claim about any real shop: it is a timing fixture.

Because the generator is known, the best any model can do on it is known too.
``--ceiling <report.json>`` (after ``--out``, with the generator's settings of the data) scores
every evaluated user with the generator's own next-item probability, its taste group inferred
from the history (the Bayes-optimal ranking: ordering by probability maximises the expected
NDCG@10 with one held-out item). A second oracle knows the same except which item follows which:
it counts that in the training items, as a model must, smoothed toward the generator's prior
(a successor is a popularity-weighted item of the same taste group; the weight chosen on
validation). Both are printed on validation and test
beside each model of a ``recstream eval`` report on the same data.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from lab.datasets import load_dataset
from lab.protocol import leave_one_out, stage_ndcg_per_user

REDRAWS = 10  # draws per step to avoid a repeat; a repeat is kept after that
STAGES = ("valid", "test")
ALPHAS = (1.0, 3.0, 10.0)  # the counted oracle's prior weights, one chosen on validation
BATCH = 256


@dataclass(frozen=True)
class Generator:
    """The fixed parts of the shop: who is popular, who belongs together, what follows what."""

    item_of_rank: np.ndarray  # the written item id of each popularity rank
    cluster: np.ndarray  # each rank's taste group
    members: list[np.ndarray]
    member_p: list[np.ndarray]
    global_p: np.ndarray
    successors: np.ndarray  # (ranks, 3): the items often bought next, same group
    p_next: float
    p_cluster: float


def build(
    n_items: int,
    *,
    clusters: int = 50,
    zipf: float = 1.0,
    p_next: float = 0.4,
    p_cluster: float = 0.8,
    seed: int = 0,
) -> tuple[Generator, np.random.Generator]:
    """The shop's fixed parts, and the random stream that goes on to draw the users."""
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
    shop = Generator(
        item_of_rank, cluster, members, member_p, global_p, successors, p_next, p_cluster
    )
    return shop, rng


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
    shop, rng = build(
        n_items, clusters=clusters, zipf=zipf, p_next=p_next, p_cluster=p_cluster, seed=seed
    )
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
            for _ in range(REDRAWS):
                if prev >= 0 and rng.random() < p_next:
                    item = int(shop.successors[prev, rng.integers(0, 3)])
                elif rng.random() < p_cluster:
                    item = int(rng.choice(shop.members[taste], p=shop.member_p[taste]))
                else:
                    item = int(rng.choice(n_items, p=shop.global_p))
                if item not in seen:
                    break
            seen.add(item)
            rows.append((user, int(shop.item_of_rank[item]), start + step * 3_600))
            prev = item
        user += 1
    return rows[:n_interactions] if len(rows) > n_interactions else rows


def taste_weights(shop: Generator, history: np.ndarray) -> tuple[np.ndarray, float]:
    """Posterior over taste groups times each group's redraw factor for the next step.

    Returns ``(w, p_next)`` such that an unseen item ``j``'s probability of being drawn next is
    ``sum_c w[c] * ((1 - p_next) * base_c(j) + p_next * successor_share(j))``.
    """
    n_groups = len(shop.members)
    uniq, pos = np.unique(history, return_inverse=True)
    mine = shop.cluster[uniq][None, :] == np.arange(n_groups)[:, None]
    mp = np.zeros(len(uniq))
    for k, r in enumerate(uniq):
        c = shop.cluster[r]
        mp[k] = shop.member_p[c][np.searchsorted(shop.members[c], r)]
    base = (1.0 - shop.p_cluster) * shop.global_p[uniq][None, :] + shop.p_cluster * mp * mine
    loglik = np.zeros(n_groups)
    seen = np.zeros(len(uniq), dtype=bool)
    steps = len(history)
    for t in range(steps + 1):
        if t == 0:
            q = base
        else:
            share = (shop.successors[history[t - 1]][:, None] == uniq[None, :]).sum(0) / 3.0
            q = (1.0 - shop.p_next) * base + shop.p_next * share[None, :]
        taken = q[:, seen].sum(1).clip(0.0, 1.0 - 1e-12)
        redraw = (1.0 - taken**REDRAWS) / (1.0 - taken)
        if t == steps:
            break
        k = pos[t]
        p = q[:, k] * (taken ** (REDRAWS - 1) if seen[k] else redraw)
        loglik += np.log(np.maximum(p, 1e-300))
        seen[k] = True
    post = np.exp(loglik - loglik.max())
    post /= post.sum()
    return post * redraw, shop.p_next


@dataclass(frozen=True)
class Counted:
    """Transitions counted in training, smoothed toward the generator's prior for successors.

    A successor is a popularity-weighted draw from the previous item's taste group, so an item
    never seen after ``prev`` still has prior mass ``alpha * member_p`` there.
    """

    counts: sparse.csr_matrix  # ranks x ranks
    totals: np.ndarray
    alpha: float

    @classmethod
    def of(cls, sequences: list[np.ndarray], n: int, alpha: float) -> Counted:
        pairs = [(s[:-1], s[1:]) for s in sequences if len(s) > 1]
        src = np.concatenate([a for a, _ in pairs])
        dst = np.concatenate([b for _, b in pairs])
        counts = sparse.csr_matrix((np.ones(len(src)), (src, dst)), shape=(n, n))
        return cls(counts, np.asarray(counts.sum(axis=1)).ravel(), alpha)


def oracle_scores(
    shop: Generator, history: np.ndarray, counted: Counted | None = None
) -> np.ndarray:
    """The generator's probability of each popularity rank being the next item (up to scale).

    With ``counted`` the successor step follows the counted transitions instead of the
    generator's true successors.
    """
    w, p_next = taste_weights(shop, history)
    mp = np.empty(len(shop.global_p))
    for c, m in enumerate(shop.members):
        mp[m] = shop.member_p[c] * w[c]
    drawn = (1.0 - shop.p_cluster) * shop.global_p * w.sum() + shop.p_cluster * mp
    scores: np.ndarray = (1.0 - p_next) * drawn
    prev = history[-1]
    if counted is None:
        np.add.at(scores, shop.successors[prev], p_next * w.sum() / 3.0)
        return scores
    step = p_next * w.sum() / (counted.totals[prev] + counted.alpha)
    lo, hi = counted.counts.indptr[prev], counted.counts.indptr[prev + 1]
    scores[counted.counts.indices[lo:hi]] += step * counted.counts.data[lo:hi]
    group = shop.cluster[prev]
    scores[shop.members[group]] += step * counted.alpha * shop.member_p[group]
    return scores


class Oracle:
    """:func:`oracle_scores` as a catalog scorer over the split's item indices."""

    name = "oracle"

    def __init__(self, shop: Generator, ranks: np.ndarray, counted: Counted | None = None) -> None:
        self.shop, self.counted = shop, counted
        self.ranks = ranks  # each catalog index's popularity rank
        self.n_items = len(ranks)

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return np.stack(
            [oracle_scores(self.shop, self.ranks[h], self.counted)[self.ranks] for h in histories]
        )


def ceiling(folder: Path, shop: Generator) -> dict[str, dict[str, float]]:
    """Mean NDCG@10 of the two oracles on validation and test of ``folder``'s shop.

    ``"oracle"`` knows everything the generator knows; ``"counted"`` knows the taste groups and
    the mixing but learns which item follows which from the training items' transitions, as
    every model must, its smoothing toward the prior chosen on validation.
    """
    split = leave_one_out(load_dataset(folder, folder.parent))
    n = len(shop.item_of_rank)
    rank_of_item = np.empty(n, dtype=np.int64)
    rank_of_item[shop.item_of_rank] = np.arange(n)
    ranks = rank_of_item[[int(i.removeprefix("i")) for i in split.item_ids]]
    train = [ranks[t] for t in split.train]

    def mean(oracle: Oracle, stage: str) -> float:
        return float(stage_ndcg_per_user(oracle, split, stage, batch=BATCH).mean())

    found = {"oracle": {stage: mean(Oracle(shop, ranks), stage) for stage in STAGES}}
    tried = {a: Counted.of(train, n, a) for a in ALPHAS}
    valid = {a: mean(Oracle(shop, ranks, c), "valid") for a, c in tried.items()}
    alpha = max(valid, key=valid.__getitem__)
    test = mean(Oracle(shop, ranks, tried[alpha]), "test")
    found["counted"] = {"valid": valid[alpha], "test": test, "alpha": alpha}
    last = np.array([ranks[h[-1]] for h in split.histories("test")])
    target = ranks[split.targets("test")]
    follows = (shop.successors[last] == target[:, None]).any(axis=1)
    counts = tried[alpha].counts
    known = np.asarray(counts[last[follows], target[follows]]).ravel() > 0
    found["targets"] = {"successor": float(follows.mean()), "seen": float(known.mean())}
    return found


def csv_text(rows: list[tuple[int, int, int]]) -> str:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["user_id", "item_id", "timestamp"])
    writer.writerows((f"u{u}", f"i{i}", ts) for u, i, ts in rows)
    return buf.getvalue()


def print_ceiling(folder: Path, shop: Generator, report: Path | None) -> None:
    found = ceiling(folder, shop)
    labels = {
        "oracle": "oracle (the generator's own probabilities)",
        "counted": "oracle with the transitions counted in training "
        f"(prior weight {found['counted']['alpha']:g})",
    }
    for name, label in labels.items():
        valid, test = found[name]["valid"], found[name]["test"]
        print(f"{label}: NDCG@10 validation {valid:.4f}, test {test:.4f}")
    share = found["targets"]
    print(
        f"test targets that are a successor of the user's last item: {share['successor']:.1%}, "
        f"of which followed that item in training: {share['seen']:.1%}"
    )
    if report is None:
        return
    results = json.loads(report.read_text(encoding="utf-8"))
    best = results["_meta"]["best_baseline"]
    base = results[best]["ndcg@10"]
    oracle = found["oracle"]["test"]
    rows = {name: row["ndcg@10"] for name, row in results.items() if name != "_meta"}
    rows.update({name: found[name]["test"] for name in labels})
    print(f"{'model':<10} {'NDCG@10':>8} {'of oracle':>10} {'vs ' + best:>10}")
    for name, score in rows.items():
        print(f"{name:<10} {score:8.4f} {score / oracle:10.1%} {score / base - 1:+10.1%}")
    print(f"+10 % over {best} needs {1.1 * base:.4f}, {1.1 * base / oracle:.1%} of the oracle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Folder to write (created).")
    parser.add_argument("--items", type=int, default=25_000)
    parser.add_argument("--interactions", type=int, default=300_000)
    parser.add_argument("--mean-len", type=float, default=15.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ceiling",
        type=Path,
        nargs="?",
        const=Path(),
        help="Instead of writing, check --out holds this generator's data and print the oracle's "
        "NDCG@10 (beside the models of the recstream eval report given, if any).",
    )
    args = parser.parse_args()
    rows = generate(args.items, args.interactions, mean_len=args.mean_len, seed=args.seed)
    text = csv_text(rows)
    target = args.out / "interactions.csv"
    if args.ceiling is not None:
        if target.read_bytes() != text.encode():
            parser.error(
                f"{target} is not this generator's data: pass the settings it was made with"
            )
        shop, _ = build(args.items, seed=args.seed)
        print_ceiling(args.out, shop, args.ceiling if args.ceiling != Path() else None)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    target.write_bytes(text.encode())
    users = len({u for u, _, _ in rows})
    items = len({i for _, i, _ in rows})
    print(f"{args.out}: {len(rows):,} interactions, {users:,} users, {items:,} items")


if __name__ == "__main__":
    main()
