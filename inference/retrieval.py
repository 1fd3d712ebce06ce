"""Retrieval for short histories: FAISS neighbours of what a new user touched, blended in.

A user with one to a few items (cold start) gives the transformer and EASE little to go on; the
MiniLM text embeddings of the items (the artifact's FAISS index) still say what those items are
like. :class:`TextRetrieval` scores the catalog by cosine to a query vector (the mean of the
history's item vectors, plus any extra query vectors, e.g. an embedded session text, later) and
:class:`RetrievalBlend` adds it to the model's standardised scores with a weight
(:func:`inference.hybrid.blend`) for histories shorter than a threshold; longer histories get the
model's scores unchanged. The weight and the threshold are fitted on validation by the lab
(``lab.hybrid.fit_retrieval``) and stored in the artifact's ``"retrieval"`` config section.

FAISS work is CPU-bound: run it in a worker, never on an event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference.exceptions import ArtifactError, InferenceError
from inference.hybrid import blend
from inference.index import ItemIndex
from inference.scoring import CatalogScorer

__all__ = ["RetrievalBlend", "RetrievalConfig", "TextRetrieval"]


@dataclass(frozen=True)
class RetrievalConfig:
    """How much retrieval counts and for whom: histories with fewer than ``max_history`` items.

    ``max_history`` 0 or ``weight`` 0 turns retrieval off. ``valid_ndcg`` keeps the validation
    figures the lab chose them by (for the record only).
    """

    weight: float = 0.0
    max_history: int = 0
    valid_ndcg: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.weight) and self.weight >= 0.0):
            raise InferenceError(f"retrieval weight must be finite and >= 0, not {self.weight}")
        if self.max_history < 0:
            raise InferenceError(f"retrieval max_history must be >= 0, not {self.max_history}")

    @property
    def active(self) -> bool:
        return self.weight > 0.0 and self.max_history > 0

    def applies(self, history_length: int) -> bool:
        """Whether a history of this many known items gets retrieval (an empty one never does)."""
        return self.active and 0 < history_length < self.max_history

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "source": "text",
            "weight": float(self.weight),
            "max_history": int(self.max_history),
        }
        if self.valid_ndcg is not None:
            out["valid_ndcg@10"] = dict(self.valid_ndcg)
        return out

    @classmethod
    def from_json(cls, section: Any) -> RetrievalConfig:
        """The config of an artifact's ``"retrieval"`` section (else :class:`ArtifactError`)."""
        try:
            if section.get("source", "text") != "text":
                raise ValueError(f"unknown retrieval source {section.get('source')!r}")
            return cls(weight=float(section["weight"]), max_history=int(section["max_history"]))
        except (AttributeError, KeyError, TypeError, ValueError, InferenceError) as exc:
            raise ArtifactError(f"malformed retrieval section: {exc}") from exc


class TextRetrieval:
    """Catalog scores from the FAISS item index: cosine of each item to the user's query vector.

    Only catalog items are scored (an index item outside the catalog is ignored); the index must
    hold every catalog item, since a history's items are looked up in it.
    """

    def __init__(self, index: ItemIndex, item_ids: Sequence[str]) -> None:
        missing = [i for i in item_ids if i not in index]
        if missing:
            raise InferenceError(
                f"the item index lacks {len(missing)} catalog items, e.g. {missing[0]!r}"
            )
        self.index = index
        self.item_ids = list(item_ids)
        self.n_items = len(self.item_ids)
        self._position = {item: pos for pos, item in enumerate(self.item_ids)}
        self._vectors = index.vectors(self.item_ids)  # catalog order

    def queries(
        self,
        histories: Sequence[np.ndarray],
        extra: Sequence[np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """One unit query per history: the mean of its items' vectors and of ``extra[r]`` (if any).

        ``extra[r]`` is any number of further query vectors of the index's dimension (a session's
        embedded text, say), each counted like one item.
        """
        if extra is not None and len(extra) != len(histories):
            raise InferenceError(f"{len(extra)} extra queries for {len(histories)} histories")
        out = np.zeros((len(histories), self.index.dim), dtype=np.float32)
        for r, hist in enumerate(histories):
            parts = [self._vectors[np.asarray(hist, dtype=np.int64)]]
            if extra is not None and extra[r] is not None:
                parts.append(np.atleast_2d(np.asarray(extra[r], dtype=np.float32)))
            rows = np.concatenate(parts)
            if len(rows):
                mean = rows.mean(axis=0)
                out[r] = mean / max(float(np.linalg.norm(mean)), 1e-9)
        return out

    def score(
        self,
        histories: Sequence[np.ndarray],
        extra: Sequence[np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """``(len(histories), n_items)`` cosines of every catalog item to each history's query.

        The FAISS search returns every unseen item in the index; a seen item (and a catalog item
        the search did not reach) gets the row's lowest score, so it never stands out.
        """
        queries = self.queries(histories, extra)
        seen = [{self.item_ids[int(i)] for i in h} for h in histories]
        ids, scores = self.index.search(queries, len(self.index), exclude=seen)
        out = np.zeros((len(histories), self.n_items), dtype=np.float32)
        for r, (row_ids, row_scores) in enumerate(zip(ids, scores, strict=True)):
            pos = np.asarray([self._position.get(i, -1) for i in row_ids], dtype=np.int64)
            keep = pos >= 0
            vals = row_scores[keep]
            out[r] = float(vals.min()) if vals.size else 0.0
            out[r, pos[keep]] = vals
        return out


class RetrievalBlend:
    """A catalog scorer: ``base``'s scores, plus retrieval for histories under the threshold.

    Rows whose history is shorter than ``config.max_history`` (and not empty) are
    ``z(base) + weight * z(retrieval)``; every other row is ``base``'s row unchanged.
    """

    def __init__(
        self, base: CatalogScorer, retrieval: TextRetrieval, config: RetrievalConfig
    ) -> None:
        if base.n_items != retrieval.n_items:
            raise InferenceError("the model and the retrieval must score the same catalog")
        self.base, self.retrieval, self.config = base, retrieval, config
        self.n_items = base.n_items
        self.name = f"{base.name}+retrieval"

    def score(
        self,
        histories: Sequence[np.ndarray],
        extra: Sequence[np.ndarray | None] | None = None,
    ) -> np.ndarray:
        scores = np.asarray(self.base.score(histories), dtype=np.float32)
        rows = [r for r, h in enumerate(histories) if self.config.applies(len(h))]
        if rows:
            short = [histories[r] for r in rows]
            more = None if extra is None else [extra[r] for r in rows]
            scores = scores.copy()
            found = self.retrieval.score(short, more)
            scores[rows] = blend(scores[rows], found, self.config.weight)
        return scores
