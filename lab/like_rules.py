"""Ways of serving "more like <title>" that were measured against the served one and not chosen.

:func:`inference.conversation.refine` shapes a ``like`` list with any
:class:`inference.conversation.LikeRule`; serving uses ``LIKE_RULE`` (the model's first seven,
the other three places by the blend of the model's score and the cosine to the film, in the
model's order). :class:`LikeVariant` spans the rules ``python -m bench.conversation
--like-variants`` compares with it: blend weights, subsets of the items (near the film, sharing
its genres, the model's first few), kept places and the order shown. docs/conversation.md has
the numbers: subsets cost the held-out item more than the blend for the same closeness; what
pays is choosing which items come towards the film, keeping the model's first few and leaving
the order to the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.conversation import LIKE_RULE, CatalogAttributes, like_score
from schemas.conversation import Constraints

__all__ = ["SERVED", "LikeVariant"]


@dataclass(frozen=True)
class LikeVariant:
    """How ``like`` shapes a list of the items that meet the hard constraints.

    Which ``k`` items are listed: the model's first ``keep`` always, the rest by
    ``z(model) + weight * z(cosine to the like items)``, drawn first from a subset: the model's
    first ``pool`` (0: all), the items sharing a genre with a ``like`` item (``shared_genre``)
    and the ``near`` share of the constrained items nearest the ``like`` items in MiniLM space
    (when the subset is short the rest follow). In which order: the model's (``model_order``),
    or the blended score's. The bench's "more like" figure (the list's mean cosine to the film)
    does not depend on the order, the held-out item's NDCG does: in the model's order the items
    the model is surest of stay on top.
    """

    weight: float = 0.0
    near: float = 1.0
    shared_genre: bool = False
    keep: int = 0
    pool: int = 0
    model_order: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.near <= 1.0 or min(self.weight, self.keep, self.pool) < 0:
            raise ValueError("near is a share in (0, 1]; weight, keep and pool are not negative")

    @property
    def name(self) -> str:
        parts = [f"weight {self.weight:g}"] if self.weight else []
        parts += [f"near {self.near:g}"] if self.near < 1.0 else []
        parts += ["shared genre"] * self.shared_genre
        parts += [f"keep {self.keep}"] if self.keep else []
        parts += [f"pool {self.pool}"] if self.pool else []
        parts += ["model order"] * self.model_order
        return ", ".join(parts) or "model"

    def __call__(
        self,
        kept: Sequence[tuple[str, float]],
        similarity: np.ndarray,
        k: int,
        constraints: Constraints,
        attributes: CatalogAttributes,
    ) -> list[tuple[str, float]]:
        items = [item for item, _ in kept]
        model = np.asarray([score for _, score in kept], dtype=np.float64)
        inside = np.ones(len(items), dtype=bool)
        if self.shared_genre:
            rows = [attributes.position[i] for i in constraints.like if i in attributes.position]
            genres = attributes.has_genre[rows].any(axis=0)
            positions = np.asarray([attributes.position[i] for i in items])
            inside &= (attributes.has_genre[positions] & genres).any(axis=1)
        if self.near < 1.0:
            count = max(k, int(np.ceil(self.near * len(items))))
            close = np.zeros(len(items), dtype=bool)
            close[np.argsort(-similarity, kind="stable")[:count]] = True
            inside &= close
        if self.pool:
            inside[self.pool :] = False  # ``kept`` is in the model's order
        inside[: self.keep] = True
        first = np.arange(len(items)) < self.keep
        combined = like_score(model, similarity, self.weight)
        # The kept items, then the subset, then the rest; each by the blend, ties in model order.
        chosen = np.lexsort((np.arange(len(items)), -combined, ~inside, ~first))[:k]
        if self.model_order:
            chosen = np.sort(chosen)
            return [kept[i] for i in chosen]
        return [(items[i], float(combined[i])) for i in chosen]


SERVED = LikeVariant(weight=LIKE_RULE.weight, keep=LIKE_RULE.keep, model_order=True)
"""The served rule (``inference.conversation.LIKE_RULE``) as a variant, so the bench can mark
its row; a test checks that both list the same items."""
