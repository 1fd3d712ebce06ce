"""How often a newcomer's list says an item is popular now, and how much that item owes to it.

A short history's served list blends what other users took up lately into the artifact's scores
(``inference.trending``); an item that this brought into the list says so
(``ArtifactRecommender.popular``, ``ScoredItem.popular``): the artifact without the counts would
not have listed it, and at least ``POPULAR_MIN_USERS`` users took it up. This script takes each
test user's first 1, 2 and 3 training items, gives the served model the counts the live system
holds when that list is made (the window of whole days up to the prefix's last item, the user's
own items counted: ``bench.cold_start_served.served_counts``), lists the top 10 and reports: how
many listed items the counts brought in, how many of those are named popular (the rest had too
few users), where the named ones would have ranked without the counts, how many users took them
up, and the share of lists with at least one.

``RECSTREAM_ARTIFACT_VERIFY_KEY_FILE=... nice python -m bench.popular_reasons --dataset ml-100k
--artifact <folder>`` (a signed artifact from ``recstream train`` on that dataset, with a
``"trending"`` section).
"""

from __future__ import annotations

import numpy as np

from bench.cold_start_served import served_counts
from bench.common import artifact_parser, cold_start_data, trending_artifact
from inference.scoring import top_k_unseen
from lab.trending import PREFIXES

K = 10


def main() -> None:
    parser = artifact_parser(__doc__ or "")
    args = parser.parse_args()
    split, recent = cold_start_data(args)
    model = trending_artifact(args, split)
    trend = model.trending
    print(
        "\n| history | users | listed | brought in by the counts | named popular | their place "
        "without the counts (median, mean) | users who took them up (median) | lists with one |"
    )
    print("|---" * 8 + "|")
    for n in PREFIXES:
        hist, rows = split.prefix_histories("test", n)
        users = split.eval_users[rows]
        brought = with_one = 0
        places: list[int] = []
        takers: list[int] = []
        for h, user in zip(hist, users, strict=True):
            history = [split.item_ids[i] for i in h]
            model.use_recent(None)
            before, _ = top_k_unseen(model.score([h]), [h], model.n_items)
            place = {model.item_ids[i]: r for r, i in enumerate(before[0].tolist())}
            moment = recent.times[user][n - 1]
            model.use_recent(
                served_counts(recent, split, int(user), n, moment=moment, days=trend.days)
            )
            listed = [item for item, _ in model.recommend([history], K)[0]]
            named = model.popular(history, listed)
            brought += sum(place[item] >= K for item in listed)
            places += [place[item] for item in named]
            takers += list(named.values())
            with_one += bool(named)
        model.use_recent(None)
        listed_n = len(hist) * K
        at = np.asarray(places)
        print(
            f"| first {n} | {len(hist)} | {listed_n} | {brought} ({brought / listed_n:.0%}) "
            f"| {len(at)} ({len(at) / listed_n:.0%}) | {np.median(at):.0f}, {at.mean():.1f} "
            f"| {np.median(takers):.0f} | {with_one / len(hist):.0%} |"
        )


if __name__ == "__main__":
    main()
