"""Cold start as served: the artifact's own scorer, given the counts the live system would hold.

``recstream eval --cold-start`` measures the blend of recent popularity as the lab defines it
(others' interactions in the 30 days up to the target's moment, blended into gen+ease). This
script measures what users get instead: the served model (``load_recommender``: INT8 on a CPU,
the artifact's retrieval and trending sections as configured) scores each test user's first 1, 2
and 3 training items through :meth:`~inference.artifact.ArtifactRecommender.use_recent`, with
the counts the stream worker keeps (one per user and item, on UTC days) summed over the
artifact's window of whole days ending on the day of a moment, up to that moment:

- ``target``: the moment of the user's next interaction (the protocol's test item), as eval does;
- ``prefix``: the moment of the prefix's last item, when the list the user sees was regenerated
  (if nothing refreshed it since);
- for an artifact whose blend is for returning users (``idle_s``), ``as served``: the list the
  user has at the test item, the one made at the prefix's last item (the model alone) when the
  test item comes within ``idle_s`` of it, else the one made again for their return, with the
  counts of its last remaking (``inference.trending.refresh_moment``). The first table gives
  every list the blend at the moments it names, as if the user were back then.

The user's own prefix items are in the counts (the fold counts them), none of their later ones
(a user with a short history has none). Prints NDCG@10 per prefix without counts (what was
served before) and with them, the change and the paired Wilcoxon p.

``RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=... nice python -m bench.cold_start_served --dataset
ml-100k --artifact <folder>`` (a signed artifact from ``recstream train`` on that dataset, with
a ``"trending"`` section).
"""

from __future__ import annotations

import numpy as np

from bench.common import artifact_parser, cold_start_data, trending_artifact
from inference.artifact import ArtifactRecommender
from inference.trending import refresh_moment
from lab.protocol import Split, ndcg_per_user, significance, target_ranks
from lab.trending import PREFIXES, RecentPopularity
from streams.trending import DAY_S, day_of


def served_counts(
    recent: RecentPopularity, split: Split, user: int, n: int, *, moment: float, days: int
) -> dict[str, int]:
    """The window's counts the live system holds at ``moment`` for ``user`` with their first
    ``n`` items folded: everyone else's interactions on the window's days up to the moment, and
    the user's own prefix items among them."""
    since = (day_of(moment) - days + 1) * DAY_S
    counts = recent.counts(user, since, moment, inclusive=True)
    for j, item in enumerate(split.train[user][:n]):
        if since <= recent.times[user][j] <= moment:
            counts[item] += 1
    return {split.item_ids[i]: int(counts[i]) for i in np.flatnonzero(counts)}


def ndcg_of(
    model: ArtifactRecommender,
    split: Split,
    hist: list[np.ndarray],
    targets: np.ndarray,
    counts: list[dict[str, int] | None],
    *,
    returning: list[bool] | None = None,
) -> np.ndarray:
    """Per-user NDCG@10 of the served scores, each user scored with their own counts (and
    ``returning``: whether the list was made again for their return)."""
    out = []
    again = returning if returning is not None else [False] * len(hist)
    for h, target, held, back in zip(hist, targets, counts, again, strict=True):
        model.use_recent(held)
        scores = model.score([h], [back])
        out.append(ndcg_per_user(target_ranks(scores, [h], np.asarray([target]))))
    model.use_recent(None)
    return np.concatenate(out)


def main() -> None:
    parser = artifact_parser(__doc__ or "")
    args = parser.parse_args()

    split, recent = cold_start_data(args)
    model = trending_artifact(args, split)
    trend = model.trending
    print(
        "\n| history | users | test item: served before | counts at its moment | change | p "
        "| counts at the prefix's last item | change | p | next item: served before "
        "| counts at the prefix's last item | change | p |"
    )
    print("|---" * 13 + "|")
    targets_all = split.targets("test")
    served_rows = []
    for n in PREFIXES:
        hist, rows = split.prefix_histories("test", n)
        targets = targets_all[rows]
        users = split.eval_users[rows]
        before = ndcg_of(model, split, hist, targets, [None] * len(hist))
        cells = []
        # The moments: the test target's, and the prefix's last item's.
        for last in (-1, n - 1):
            held: list[dict[str, int] | None] = [
                served_counts(
                    recent, split, int(u), n, moment=recent.times[u][last], days=trend.days
                )
                for u in users
            ]
            after = ndcg_of(model, split, hist, targets, held, returning=[True] * len(hist))
            p = significance(after, before)["wilcoxon_p"]
            cells.append(f"{after.mean():.4f} | {after.mean() / before.mean() - 1:+.1%} | {p:.2g}")
        # A new user's next item, from the counts when the prefix's list was made.
        ok = [i for i, u in enumerate(users) if len(split.train[u]) > n]
        nexts = np.asarray([split.train[users[i]][n] for i in ok])
        short = [hist[i] for i in ok]
        plain = ndcg_of(model, split, short, nexts, [None] * len(ok))
        held = [
            served_counts(
                recent,
                split,
                int(users[i]),
                n,
                moment=recent.times[users[i]][n - 1],
                days=trend.days,
            )
            for i in ok
        ]
        after = ndcg_of(model, split, short, nexts, held, returning=[True] * len(ok))
        p = significance(after, plain)["wilcoxon_p"]
        cells.append(
            f"{plain.mean():.4f} | {after.mean():.4f} | {after.mean() / plain.mean() - 1:+.1%} "
            f"| {p:.2g}"
        )
        print(f"| first {n} | {len(hist)} | {before.mean():.4f} | {' | '.join(cells)} |")
        if trend.idle_s:
            served_rows.append(as_served(model, split, recent, n, hist, targets, users, before))
    if served_rows:
        print(
            f"\nAs served (the blend for users away {trend.idle_s} s or more; the others keep the "
            "list made at the prefix's last item, the model's alone):\n"
        )
        print("| history | users | away | test item: served before | as served | change | p |")
        print("|---" * 7 + "|")
        print("\n".join(served_rows))


def as_served(  # noqa: PLR0917 - one row of the table, its parts named at the call
    model: ArtifactRecommender,
    split: Split,
    recent: RecentPopularity,
    n: int,
    hist: list[np.ndarray],
    targets: np.ndarray,
    users: np.ndarray,
    before: np.ndarray,
) -> str:
    """The test item's NDCG@10 with the list each user has then, for a returning users' blend."""
    trend = model.trending
    held: list[dict[str, int] | None] = []
    back: list[bool] = []
    for u in users:
        remade = refresh_moment(recent.times[u][n - 1], recent.times[u][-1], trend.idle_s)
        back.append(remade is not None)
        held.append(
            None
            if remade is None
            else served_counts(recent, split, int(u), n, moment=remade, days=trend.days)
        )
    after = ndcg_of(model, split, hist, targets, held, returning=back)
    p = significance(after, before)["wilcoxon_p"]
    return (
        f"| first {n} | {len(hist)} | {np.mean(back):.0%} | {before.mean():.4f} | "
        f"{after.mean():.4f} | {after.mean() / before.mean() - 1:+.1%} | {p:.2g} |"
    )


if __name__ == "__main__":
    main()
