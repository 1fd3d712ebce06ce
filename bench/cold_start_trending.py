"""Cold start with recent popularity, chosen on held-out users, judged on the test prefixes.

1. :func:`lab.trending.heldout_grid`: EASE (its settings tuned on validation) fitted without
   each of five folds of users; each held-out user's first 1, 2 and 3 training items predict
   their last ten training items, recent popularity counted up to each target's moment, and
   their next three items, recent popularity counted up to the prefix's last item. Prints every
   blend's relative NDCG@10 change on both (with its standard error over the pairs) and the one
   :func:`lab.trending.choose` picks (no loss on the next items beyond a standard error or 1 %;
   training adds the served model's guard).
2. How long after the longest prefix the protocol's test target comes.
3. The artifact's model (its served scorer without retrieval) on the protocol of ``recstream
   eval --cold-start`` (each test user's first 1, 2, 3 training items, the user's last
   interaction as the target), alone and blended with recent popularity: the pick, then every
   blend of the grid, on the test and (for comparison) the leave-one-out validation prefixes,
   with the paired Wilcoxon p on test. A blend of every list counts up to the target's moment;
   one for returning users only reaches the users away that long, with the counts of their
   list's last remaking (:func:`lab.trending.at_targets`).

``RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=... nice python -m bench.cold_start_trending --dataset
ml-100k --artifact <folder>`` (a signed artifact from ``recstream train`` on that dataset).
"""

from __future__ import annotations

import numpy as np

from bench.common import artifact_parser, cold_start_data
from inference.artifact import load_recommender
from inference.hybrid import standardise
from inference.trending import recent_feature
from lab.evaluate import describe_blend
from lab.protocol import ndcg_per_user, significance, target_ranks
from lab.training import default_teacher
from lab.trending import (
    DAY_S,
    DAYS,
    IDLES,
    NEXT_ITEMS,
    PREFIXES,
    SCALE,
    WEIGHTS,
    Cell,
    at_targets,
    choose,
    heldout_grid,
)

BATCH = 128
# Every blend of the grid, (days, weight, idle), in the order the tables print them.
BLENDS = [(d, w, idle) for idle in IDLES for d in DAYS for w in WEIGHTS]


def _blend(cell: tuple[float, float, float]) -> str:
    """A blend's first three table cells: away (hours), days, weight."""
    d, w, idle = cell
    return f"{idle / 3600:g} | {d:g} | {w:g}"


def _pct(values: list[float]) -> str:
    return " / ".join(f"{v:+.1%}" for v in values)


def main() -> None:
    parser = artifact_parser(__doc__ or "")
    parser.add_argument("--folds", type=int, default=5, help="folds of held-out users")
    parser.add_argument("--targets", type=int, default=10, help="targets per held-out user")
    args = parser.parse_args()

    prefixes = PREFIXES
    split, recent = cold_start_data(args)

    fit = default_teacher(split)
    grid = heldout_grid(
        split, recent, fit, prefixes, DAYS, WEIGHTS, args.folds, args.targets, idles=IDLES
    )
    upcoming = heldout_grid(
        split,
        recent,
        fit,
        prefixes,
        DAYS,
        WEIGHTS,
        args.folds,
        NEXT_ITEMS,
        upcoming=True,
        idles=IDLES,
    )
    pick = choose(grid, prefixes, DAYS, WEIGHTS, guards=(upcoming,), idles=IDLES)
    base = {n: grid[n, 0.0, 0.0, 0.0] for n in prefixes}
    ahead = {n: upcoming[n, 0.0, 0.0, 0.0] for n in prefixes}
    print(
        f"{split.dataset}: held-out users ({args.folds} folds, EASE fitted without each), "
        f"first 1 / 2 / 3 items -> each user's last {args.targets} training items; "
        f"pairs {' / '.join(str(len(base[n])) for n in prefixes)}; EASE alone NDCG@10 "
        + " / ".join(f"{base[n].mean():.4f}" for n in prefixes)
    )
    print(
        f"the next {NEXT_ITEMS} items, recent popularity at the prefix's last item: EASE alone "
        + " / ".join(f"{ahead[n].mean():.4f}" for n in prefixes)
    )

    def cells(table: dict[Cell, np.ndarray], cell: tuple[float, float, float]) -> str:
        out = []
        for n in prefixes:
            alone = table[n, 0.0, 0.0, 0.0]
            diff = table[(n, *cell)] - alone
            se = diff.std() / np.sqrt(len(diff)) / alone.mean()
            out.append(f"{table[(n, *cell)].mean() / alone.mean() - 1:+.1%} ± {se:.1%}")
        return " / ".join(out)

    print(
        "\n| away (h) | days | weight | held-out change 1 / 2 / 3 (± s.e.) | mean "
        "| next items 1 / 2 / 3 |"
    )
    print("|---|---|---|---|---|---|")
    for cell in BLENDS:
        mean = np.mean([grid[(n, *cell)].mean() / base[n].mean() - 1 for n in prefixes])
        later, soon = cells(grid, cell), cells(upcoming, cell)
        print(f"| {_blend(cell)} | {later} | {mean:+.1%} | {soon} |")
    print(
        f"\nheld-out pick (no next-items prefix lower by more than its standard error and 1 %): "
        f"{describe_blend(pick)} (mean {pick.gain:+.1%}, next items {pick.next_gain or 0.0:+.1%})"
    )

    # How far the protocol's test target lies after the last item of the longest prefix.
    gaps = np.asarray(
        [
            (recent.times[u][-1] - recent.times[u][max(prefixes) - 1]) / DAY_S
            for u in split.eval_users
            if len(split.train[u]) >= max(prefixes)
        ]
    )
    print(
        f"test target after item {max(prefixes)}: within a day for {np.mean(gaps < 1):.0%} of "
        f"the users, more than 30 days later for {np.mean(gaps > 30):.0%}"
    )

    model = load_recommender(args.artifact, retrieval=False)
    if model.item_ids != split.item_ids:
        raise SystemExit(f"artifact {args.artifact} was not trained on {split.dataset}")
    ndcg: dict[tuple[str, int, float, float, float], np.ndarray] = {}
    for stage in ("valid", "test"):
        for n in prefixes:
            hist, rows = split.prefix_histories(stage, n)
            targets = split.targets(stage)[rows]
            scores = np.concatenate(
                [model.model_score(hist[s : s + BATCH]) for s in range(0, len(hist), BATCH)]
            )
            model_z = standardise(scores)
            ndcg[stage, n, 0.0, 0.0, 0.0] = ndcg_per_user(target_ranks(model_z, hist, targets))
            for idle in IDLES:
                for d in DAYS:
                    counted = at_targets(recent, split, stage, rows, d, idle, prefix=n)
                    fresh = recent_feature(counted, SCALE)
                    for w in WEIGHTS:
                        ranks = target_ranks(model_z + w * fresh, hist, targets)
                        ndcg[stage, n, d, w, idle] = ndcg_per_user(ranks)

    def change(stage: str, cell: tuple[float, float, float]) -> list[float]:
        return [
            ndcg[(stage, n, *cell)].mean() / ndcg[stage, n, 0.0, 0.0, 0.0].mean() - 1
            for n in prefixes
        ]

    def p_values(cell: tuple[float, float, float]) -> str:
        tests = [
            significance(ndcg[("test", n, *cell)], ndcg["test", n, 0.0, 0.0, 0.0]) for n in prefixes
        ]
        return " / ".join(f"{t['wilcoxon_p']:.2g}" for t in tests)

    print(
        f"\n{model.name} ({model.version}) on the protocol's prefixes, NDCG@10 alone: "
        + "; ".join(
            f"{stage} "
            + " / ".join(f"{ndcg[stage, n, 0.0, 0.0, 0.0].mean():.4f}" for n in prefixes)
            for stage in ("valid", "test")
        )
    )
    if pick.weight > 0:
        chosen = (pick.days, pick.weight, pick.idle)
        with_pick = " / ".join(f"{ndcg[('test', n, *chosen)].mean():.4f}" for n in prefixes)
        print(
            f"the held-out pick on test: {with_pick} ({_pct(change('test', chosen))}, "
            f"Wilcoxon p {p_values(chosen)})"
        )
    print(
        "\n| away (h) | days | weight | leave-one-out valid 1 / 2 / 3 | test 1 / 2 / 3 | test p |"
    )
    print("|---|---|---|---|---|---|")
    for cell in BLENDS:
        print(
            f"| {_blend(cell)} | {_pct(change('valid', cell))} | {_pct(change('test', cell))} "
            f"| {p_values(cell)} |"
        )


if __name__ == "__main__":
    main()
