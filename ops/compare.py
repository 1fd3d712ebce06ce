"""Comparing two sets of recommendation lists (live model vs a replayed model, or two topics).

Per user present in both sets, on the top ``k`` of each list:

- **overlap@k** = |top-k(A) ∩ top-k(B)| / k;
- **rank correlation**: Kendall's tau-b over the *union* of the two top-k lists, where an item
  missing from a list is ranked k + 1 there (tied with the other missing items). Identical lists
  give 1, a reversed list -1, two disjoint lists a negative value (each list puts its own items
  first), so it rewards agreeing on both membership and order. Undefined (NaN, left out of the
  mean) when the union has fewer than two items;
- **changed**: the ordered top-k lists differ; **membership changed**: their item sets differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Comparison", "compare", "kendall_tau_union", "overlap_at_k"]


def overlap_at_k(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """Share of the k slots whose items both top-k lists contain."""
    if k < 1:
        raise ValueError("k must be at least 1")
    return len(set(a[:k]) & set(b[:k])) / k


def kendall_tau_union(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """Kendall's tau-b of the two top-k rankings over their union (missing = rank k + 1)."""
    top_a, top_b = list(a[:k]), list(b[:k])
    union = list(dict.fromkeys([*top_a, *top_b]))
    if len(union) < 2:
        return math.nan
    rank_a = {item: r for r, item in enumerate(top_a)}
    rank_b = {item: r for r, item in enumerate(top_b)}
    xs = [rank_a.get(item, k) for item in union]
    ys = [rank_b.get(item, k) for item in union]
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(union)):
        for j in range(i + 1, len(union)):
            dx, dy = xs[i] - xs[j], ys[i] - ys[j]
            if dx == 0 and dy == 0:
                ties_x += 1
                ties_y += 1
            elif dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    pairs = len(union) * (len(union) - 1) // 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    if denominator == 0:
        return math.nan
    return (concordant - discordant) / denominator


@dataclass(frozen=True)
class Comparison:
    """Aggregates over the users both sets have lists for."""

    k: int
    users: int
    only_a: int
    only_b: int
    overlap_mean: float
    tau_mean: float
    tau_users: int
    changed: int
    membership_changed: int

    def describe(self, name_a: str = "A", name_b: str = "B") -> list[str]:
        def fmt(x: float) -> str:
            return "n/a" if math.isnan(x) else f"{x:.4f}"

        return [
            f"users compared: {self.users} (only in {name_a}: {self.only_a}, "
            f"only in {name_b}: {self.only_b})",
            f"overlap@{self.k} (mean): {fmt(self.overlap_mean)}",
            f"Kendall tau-b over the union of top-{self.k} (mean of {self.tau_users} users): "
            f"{fmt(self.tau_mean)}",
            f"users whose top-{self.k} changed: {self.changed} "
            f"(item set changed: {self.membership_changed})",
        ]


def compare(a: Mapping[str, Sequence[str]], b: Mapping[str, Sequence[str]], k: int) -> Comparison:
    """Compare per-user lists (item ids, best first) of two sets."""
    shared = sorted(set(a) & set(b))
    overlaps = [overlap_at_k(a[u], b[u], k) for u in shared]
    taus = [t for t in (kendall_tau_union(a[u], b[u], k) for u in shared) if not math.isnan(t)]
    changed = sum(1 for u in shared if list(a[u][:k]) != list(b[u][:k]))
    members = sum(1 for u in shared if set(a[u][:k]) != set(b[u][:k]))
    return Comparison(
        k=k,
        users=len(shared),
        only_a=len(set(a) - set(b)),
        only_b=len(set(b) - set(a)),
        overlap_mean=sum(overlaps) / len(overlaps) if overlaps else math.nan,
        tau_mean=sum(taus) / len(taus) if taus else math.nan,
        tau_users=len(taus),
        changed=changed,
        membership_changed=members,
    )
