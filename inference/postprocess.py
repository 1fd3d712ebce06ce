"""The last step of every model: turn scored candidates into a list that is safe to publish.

In order: drop candidates with a non-finite score and duplicates, drop items the user has already
seen, drop anything that is not in the catalog (counted, since a model that proposes unknown items
is broken), optionally drop items whose cosine similarity to the user's profile embedding is below
a floor, and optionally diversify with maximal marginal relevance (MMR) before taking the top k.

:class:`CatalogPost` runs those optional steps in the served path (``ArtifactRecommender`` with an
artifact that carries the item index) and in ``recstream eval`` (the ``gen+ease+post`` row), on
the model's best unseen candidates, with the index's item text embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from inference.exceptions import InferenceError

__all__ = ["CatalogPost", "PostConfig", "Postprocessed", "mmr", "postprocess"]

VectorLookup = Callable[[Sequence[str]], npt.NDArray[np.float32]]


@dataclass(frozen=True, slots=True)
class Postprocessed:
    """The final ranking and what each step removed."""

    item_ids: list[str]
    scores: list[float]
    dropped_invalid: int = 0  # non-finite score or duplicate candidate
    dropped_seen: int = 0
    rejected_unknown: int = 0  # not in the catalog
    dropped_floor: int = 0


def mmr(
    relevance: npt.ArrayLike,
    vectors: npt.NDArray[np.float32],
    k: int,
    lam: float,
) -> list[int]:
    """Pick ``k`` rows greedily by ``lam * relevance - (1 - lam) * max similarity to the picked``.

    Relevance is min-max scaled to [0, 1] so it is commensurate with cosine similarity;
    ``lam = 1`` keeps the relevance order, smaller values trade relevance for variety.
    """
    if not 0.0 <= lam <= 1.0:
        raise InferenceError(f"MMR lambda must be in [0, 1], got {lam}")
    rel = np.asarray(relevance, dtype=np.float64)
    n = len(rel)
    if n == 0 or k <= 0:
        return []
    span = float(rel.max() - rel.min())
    rel = (rel - rel.min()) / span if span > 0 else np.ones(n)
    unit = vectors.astype(np.float64)
    unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    chosen: list[int] = []
    max_sim = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    for _ in range(min(k, n)):
        penalty = np.where(np.isfinite(max_sim), max_sim, 0.0)
        gain = np.where(available, lam * rel - (1.0 - lam) * penalty, -np.inf)
        best = int(np.argmax(gain))
        chosen.append(best)
        available[best] = False
        max_sim = np.maximum(max_sim, sims[best])
    return chosen


def postprocess(
    candidate_ids: Sequence[str],
    scores: npt.ArrayLike,
    *,
    k: int,
    catalog: Collection[str],
    seen: Collection[str] = (),
    profile: npt.NDArray[np.float32] | None = None,
    item_vectors: VectorLookup | None = None,
    cosine_floor: float | None = None,
    mmr_lambda: float | None = None,
) -> Postprocessed:
    """Filter and order scored candidates (higher score is better) into at most ``k`` items.

    ``item_vectors`` maps item ids to their embeddings (e.g. ``ItemIndex.vectors``); it is needed
    for ``cosine_floor`` (together with the user's ``profile`` embedding) and for ``mmr_lambda``.
    """
    score_arr = np.asarray(scores, dtype=np.float64)
    if score_arr.shape != (len(candidate_ids),):
        raise InferenceError(f"{score_arr.shape} scores for {len(candidate_ids)} candidates")
    needs_vectors = cosine_floor is not None or mmr_lambda is not None
    if needs_vectors and item_vectors is None:
        raise InferenceError("cosine_floor and mmr_lambda need item_vectors")
    if cosine_floor is not None and profile is None:
        raise InferenceError("cosine_floor needs the user's profile embedding")

    seen_set = set(seen)
    order = np.argsort(-np.nan_to_num(score_arr, nan=-np.inf), kind="stable")
    kept_ids: list[str] = []
    kept_scores: list[float] = []
    taken: set[str] = set()
    invalid = seen_n = unknown = 0
    for pos in order:
        item_id, score = candidate_ids[pos], float(score_arr[pos])
        if not math.isfinite(score) or item_id in taken:
            invalid += 1
        elif item_id in seen_set:
            seen_n += 1
        elif item_id not in catalog:
            unknown += 1
        else:
            taken.add(item_id)
            kept_ids.append(item_id)
            kept_scores.append(score)

    floor_n = 0
    vectors: npt.NDArray[np.float32] | None = None
    if needs_vectors and kept_ids:
        assert item_vectors is not None  # checked above
        vectors = item_vectors(kept_ids)
        if cosine_floor is not None:
            assert profile is not None  # checked above
            unit = profile / max(float(np.linalg.norm(profile)), 1e-12)
            norms = np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
            keep = (vectors @ unit) / norms >= cosine_floor
            floor_n = int((~keep).sum())
            kept_ids = [i for i, ok in zip(kept_ids, keep, strict=True) if ok]
            kept_scores = [s for s, ok in zip(kept_scores, keep, strict=True) if ok]
            vectors = vectors[keep]

    if mmr_lambda is not None and vectors is not None:
        picked = mmr(kept_scores, vectors, k, mmr_lambda)
        kept_ids = [kept_ids[i] for i in picked]
        kept_scores = [kept_scores[i] for i in picked]
    return Postprocessed(
        kept_ids[:k],
        kept_scores[:k],
        dropped_invalid=invalid,
        dropped_seen=seen_n,
        rejected_unknown=unknown,
        dropped_floor=floor_n,
    )


class PostConfig(BaseModel):
    """The optional served post-processing steps, both off unless set: the regeneration settings
    carry it as their ``regen_post`` sub-model.

    Off by default because on ml-100k neither step paid for itself (``recstream eval``'s
    ``gen+ease+post`` rows, docs/models.md): MiniLM cosines of a profile to any movie lie between
    about 0.5 and 0.75, so a floor up to 0.5 changes nothing and 0.6 costs NDCG@10; MMR trades a
    little NDCG@10 for diversity.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    cosine_floor: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Drop candidates whose text cosine to the user's profile is below this.",
    )
    mmr_lambda: float | None = Field(
        None, ge=0.0, le=1.0, description="Diversify with MMR at this lambda (1 = relevance only)."
    )
    candidates: int = Field(
        100, ge=1, description="The model's best unseen items the steps choose from."
    )

    @property
    def active(self) -> bool:
        return self.cosine_floor is not None or self.mmr_lambda is not None


class CatalogPost:
    """Cosine floor and MMR over a catalog in index order, with one text embedding per item.

    The profile is the mean embedding of the history's items (``profile_embedding``); a history
    with no item has no profile, so the floor is skipped for it.
    """

    def __init__(
        self, item_ids: Sequence[str], vectors: npt.NDArray[np.float32], config: PostConfig
    ) -> None:
        if vectors.shape[0] != len(item_ids):
            raise InferenceError(f"{vectors.shape[0]} vectors for {len(item_ids)} items")
        self.item_ids = list(item_ids)
        self.vectors = vectors
        self.config = config
        self._pos = {item: i for i, item in enumerate(self.item_ids)}

    def _lookup(self, ids: Sequence[str]) -> npt.NDArray[np.float32]:
        return self.vectors[[self._pos[i] for i in ids]]

    def top(
        self, scores: npt.NDArray[np.float32], history: npt.NDArray[np.int64], k: int
    ) -> tuple[list[int], list[float]]:
        """The ``k`` catalog indices (and model scores) left after the steps, best first."""
        from inference.embeddings import profile_embedding
        from inference.scoring import top_k_unseen

        cand, cand_scores = top_k_unseen(
            scores[None, :].copy(), [history], max(self.config.candidates, k)
        )
        finite = np.isfinite(cand_scores[0])
        ids = [self.item_ids[i] for i in cand[0][finite]]
        floor = self.config.cosine_floor
        profile = profile_embedding(self.vectors[history]) if len(history) else None
        result = postprocess(
            ids,
            cand_scores[0][finite],
            k=k,
            catalog=self._pos,
            profile=profile,
            item_vectors=self._lookup,
            cosine_floor=floor if profile is not None else None,
            mmr_lambda=self.config.mmr_lambda,
        )
        return [self._pos[i] for i in result.item_ids], result.scores
