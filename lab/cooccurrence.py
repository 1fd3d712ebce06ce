"""Item co-occurrence CF fitted on a whole dataset: the operator replay's model without an artifact.

``recstream ops replay-regen`` without ``--artifact`` regenerates with this model, fitted on the
dataset's interactions at start-up. Services never use it; they serve verified artifacts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inference.recommender import Ranked
from lab.datasets import load_dataset

__all__ = ["CooccurrenceRecommender", "fit_cooccurrence"]


class CooccurrenceRecommender:
    """Item co-occurrence collaborative filtering, scored with torch on the worker's device.

    A user's score for item j is the recency-weighted sum, over the items in the history, of how
    many training users interacted with both (rows normalised so very popular items do not swamp
    the list), plus a small popularity prior that breaks ties for short histories.
    """

    name = "cooc"
    version = "1"

    def __init__(
        self,
        item_ids: list[str],
        user_histories: Sequence[Sequence[str]],
        decay: float = 0.9,
        max_history: int = 50,
    ) -> None:
        import scipy.sparse as sp
        import torch

        self.item_ids = item_ids
        self.index = {item: i for i, item in enumerate(item_ids)}
        self.decay = decay
        self.max_history = max_history
        rows, cols = [], []
        for u, history in enumerate(user_histories):
            for item in set(history):
                if item in self.index:
                    rows.append(u)
                    cols.append(self.index[item])
        ui = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)),
            shape=(len(user_histories), len(item_ids)),
        )
        co = (ui.T @ ui).toarray().astype(np.float32)
        popularity = np.diag(co).copy()
        np.fill_diagonal(co, 0.0)
        co /= np.maximum(co.sum(axis=1, keepdims=True), 1.0)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._co = torch.from_numpy(co).to(self.device)
        prior = popularity / max(float(popularity.max()), 1.0)
        self._prior = torch.from_numpy(prior * 1e-3).to(self.device)

    def recommend(self, histories: list[list[str]], k: int) -> list[Ranked]:
        import torch

        n = len(self.item_ids)
        # Built in numpy: per-element torch indexing costs microseconds each, numpy is cheap.
        weights = np.zeros((len(histories), n), dtype=np.float32)
        seen = np.zeros((len(histories), n), dtype=bool)
        for row, history in enumerate(histories):
            known = [self.index[i] for i in history if i in self.index]
            if not known:
                continue
            seen[row, known] = True
            recent = known[-self.max_history :][::-1]  # newest first: age 0, 1, 2, ...
            np.add.at(weights[row], recent, self.decay ** np.arange(len(recent), dtype=np.float32))
        with torch.inference_mode():
            w = torch.from_numpy(weights).to(self.device)
            scores = w @ self._co + self._prior
            scores = scores.masked_fill(torch.from_numpy(seen).to(self.device), float("-inf"))
            top = torch.topk(scores, min(k, n), dim=1)
        values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
        return [
            [
                (self.item_ids[i], float(v))
                for i, v in zip(idx_row, val_row, strict=True)
                if v != float("-inf")
            ]
            for idx_row, val_row in zip(indices, values, strict=True)
        ]


def fit_cooccurrence(dataset: str, data_dir: Path) -> CooccurrenceRecommender:
    """The co-occurrence model of every user history in ``dataset``."""
    ds = load_dataset(dataset, data_dir)
    histories = [[it.item_id for it in h] for h in ds.histories().values()]
    return CooccurrenceRecommender(list(ds.items), histories)
