"""What runs inside one pool worker process, and the recommenders the pool can load there.

A worker is started by :class:`inference.pool.WorkerPool` with the ``spawn`` start method. It sizes
torch's thread pool, loads its recommender once, warms it up with a real batch, answers a ready
message, and then serves messages from its pipe until told to stop:

- ``("batch", batch_id, histories, k)`` → ``("result", batch_id, lists)`` or
  ``("error", batch_id, text)`` when the model raised;
- ``("ping", token)`` → ``("pong", token, info)`` after a small computation on the device;
- ``("stop",)`` → the worker exits.

A recommender is any object with ``recommend(histories, k) -> list[list[(item_id, score)]]``
(histories hold item ids oldest → newest; seen items are excluded). Loaders are picklable
callables so the parent can name what each child should build.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from inference.recommender import Ranked, Recommender

__all__ = [
    "CooccurrenceRecommender",
    "DatasetModelLoader",
    "PopularityRecommender",
    "worker_main",
]


class PopularityRecommender:
    """Most-interacted items, seen items excluded: cheap enough to answer inside the parent.

    The pool's fallback: it needs no torch and answers in microseconds, so a timed-out or failed
    request still gets a real, catalog-only list.
    """

    name = "pop"
    version = "1"

    def __init__(self, counts: dict[str, int]) -> None:
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        top = ranked[0][1] if ranked else 1
        self._ranked: list[tuple[str, float]] = [(item, n / top) for item, n in ranked]

    @classmethod
    def from_interactions(cls, item_ids: Sequence[str]) -> PopularityRecommender:
        return cls(dict(Counter(item_ids)))

    @property
    def items(self) -> list[str]:
        return [item for item, _ in self._ranked]

    def recommend(self, histories: list[list[str]], k: int) -> list[Ranked]:
        out: list[Ranked] = []
        for history in histories:
            seen = set(history)
            picks: Ranked = []
            for item, score in self._ranked:
                if item not in seen:
                    picks.append((item, score))
                    if len(picks) == k:
                        break
            out.append(picks)
        return out


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


@dataclass(frozen=True)
class DatasetModelLoader:
    """Builds a recommender in the worker: a trained artifact when given, else co-occurrence CF.

    Picklable, so the parent passes it to spawned workers. ``artifact`` is a folder written by
    ``recstream train``; without one, the co-occurrence model is fitted on ``dataset``.
    """

    dataset: str
    data_dir: Path
    artifact: Path | None = None

    def __call__(self) -> Recommender:
        if self.artifact is not None:
            import importlib

            # The trained-artifact loader lives beside the models; imported by name so this
            # module does not depend on it until an artifact is asked for.
            artifact_module = importlib.import_module("inference.artifact")
            loaded: Recommender = artifact_module.load_recommender(self.artifact)
            return loaded
        from lab.datasets import load_dataset

        ds = load_dataset(self.dataset, self.data_dir)
        histories = [[it.item_id for it in h] for h in ds.histories().values()]
        return CooccurrenceRecommender(list(ds.items), histories)


def _touch_device(model: object) -> dict[str, Any]:
    """A tiny real computation on the model's device, for the health check.

    Models that never imported torch (numpy/scipy ones) run on the CPU, checked with numpy.
    """
    if "torch" not in sys.modules:
        value = float((np.ones(8) * 2).sum())
        device: object = "cpu"
    else:
        import torch

        device = getattr(model, "device", None) or torch.device(
            "cuda" if torch.cuda.is_available() else "cpu"
        )
        value = (torch.ones(8, device=device) * 2).sum().item()
    if value != 16.0:
        raise RuntimeError(f"device {device} computed {value}, expected 16")
    return {"device": str(device), "pid": os.getpid()}


def worker_main(
    conn: Connection,
    loader: Callable[[], Recommender],
    threads: int,
    warmup_history: list[str],
    device_index: int | None = None,
) -> None:
    """Entry point of a worker process (spawned; everything here runs in the child)."""
    if device_index is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(device_index)
    # Before any numeric library loads: torch, numpy's BLAS and OpenMP all size their thread
    # pools from these, so workers x threads stays within the cores.
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(max(1, threads))
    started = time.perf_counter()
    try:
        model = loader()
        if "torch" in sys.modules:  # imported by the model; torch is not needed otherwise
            import torch

            torch.set_num_threads(max(1, threads))
        model.recommend([warmup_history], 10)  # warm-up: first call allocates and compiles
        info = _touch_device(model)
    except Exception:  # the parent must learn why the worker could not start
        conn.send(("failed", traceback.format_exc()))
        return
    info["model"] = getattr(model, "name", type(model).__name__)
    info["version"] = str(getattr(model, "version", "1"))
    info["warmup_s"] = time.perf_counter() - started
    conn.send(("ready", info))
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent went away
            return
        kind = message[0]
        if kind == "stop":
            return
        if kind == "ping":
            conn.send(("pong", message[1], _touch_device(model)))
            continue
        _, batch_id, histories, k = message
        try:
            lists = model.recommend(histories, k)
        except Exception:  # reported per batch so the parent can fall back for those requests
            conn.send(("error", batch_id, traceback.format_exc(limit=5)))
            continue
        conn.send(("result", batch_id, lists))
