"""``gen+rerank``: the transformer's top candidates reranked with the language model.

The transformer proposes its top ``top_n`` unseen items; the SmolLM2 reranker scores those
candidates from a prompt built on the user's recent titles (a verbalizer over candidate letters,
so it can only pick among them). The two rankings are combined by weighted reciprocal-rank fusion,
``(1 - w) / (c + rank_gen) + w / (c + rank_llm)``, with ``w`` tuned on validation NDCG@10 (``w = 0``
is allowed, so the stage is only kept where it helps). Items outside the candidate list keep the
transformer's order below the reranked head, so the whole catalog is still ranked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from inference.scoring import CatalogScorer, top_k_unseen
from lab.baselines import Ranker
from lab.datasets import Item
from lab.protocol import Split, metrics_from_ranks, target_ranks

__all__ = ["FUSION_WEIGHTS", "GenRerank", "fuse"]

FUSION_WEIGHTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
RRF_C = 10.0
PROMPT_HISTORY = 10
TUNE_USERS = 200


def fuse(gen_rank: np.ndarray, llm_scores: np.ndarray, weight: float) -> np.ndarray:
    """Fused scores of one user's candidates (gen ranks 0..n-1; higher llm score is better)."""
    llm_rank = np.empty(len(llm_scores), dtype=np.float64)
    llm_rank[np.argsort(-np.asarray(llm_scores), kind="stable")] = np.arange(len(llm_scores))
    return (1.0 - weight) / (RRF_C + gen_rank) + weight / (RRF_C + llm_rank)


class GenRerank(Ranker):
    """Transformer candidates, reranked by the language model and fused by rank."""

    name = "gen+rerank"

    def __init__(
        self,
        gen: CatalogScorer,
        split: Split,
        *,
        top_n: int = 20,
        reranker: Any = None,
        say: Callable[[str], None] = print,
        tune_users: int = TUNE_USERS,
    ) -> None:
        self.tune_users = tune_users
        self.gen = gen
        self.n_items = gen.n_items
        self.top_n = top_n
        self.weight = 0.0
        self.say = say
        self._items = [split.items.get(i, Item(i, i)) for i in split.item_ids]
        self._reranker = reranker

    def _llm(self) -> Any:
        if self._reranker is None:
            from lab.reranker import LLMReranker

            self._reranker = LLMReranker.load()
        return self._reranker

    def _candidates(
        self, histories: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        scores = self.gen.score(histories)
        top, _ = top_k_unseen(scores.copy(), histories, self.top_n)
        llm = np.stack(
            self._llm().score_batch(
                [[self._items[i] for i in h[-PROMPT_HISTORY:]] for h in histories],
                [[self._items[i] for i in cand] for cand in top],
            )
        ).astype(np.float64)
        return scores, top, llm

    def _apply(self, scores: np.ndarray, top: np.ndarray, llm: np.ndarray, w: float) -> np.ndarray:
        out = np.array(scores, dtype=np.float32, copy=True)
        finite = out[np.isfinite(out)]
        head = (float(finite.max()) if finite.size else 0.0) + 1.0
        ranks = np.arange(top.shape[1], dtype=np.float64)
        for row in range(len(out)):
            out[row, top[row]] = head + fuse(ranks, llm[row], w).astype(np.float32)
        return out

    def fit(self, split: Split) -> GenRerank:
        """Tune the fusion weight on the first ``tune_users`` validation users."""
        hist = split.histories("valid")[: self.tune_users]
        targets = split.targets("valid")[: self.tune_users]
        scores, top, llm = self._candidates(hist)
        best = (-1.0, 0.0)
        for w in FUSION_WEIGHTS:
            ranks = target_ranks(self._apply(scores, top, llm, w), hist, targets)
            ndcg = metrics_from_ranks(ranks)["ndcg@10"]
            self.say(f"  gen+rerank w={w}: valid ndcg@10={ndcg:.4f}")
            if ndcg > best[0]:
                best = (ndcg, w)
        self.weight = best[1]
        self.say(f"gen+rerank: fusion weight {self.weight} (valid ndcg@10 {best[0]:.4f})")
        return self

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        scores, top, llm = self._candidates(histories)
        return self._apply(scores, top, llm, self.weight)
