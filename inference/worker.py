"""What runs inside one pool worker process, and the loader of the artifact it serves.

A worker is started by :class:`inference.pool.WorkerPool` with the ``spawn`` start method. It sizes
torch's thread pool, loads its recommender once, warms it up with a real batch, answers a ready
message, and then serves messages from its pipe until told to stop:

- ``("batch", batch_id, histories, k)`` or ``("batch", batch_id, histories, k, returning)``
  (per history, whether the list is made again for a user who has been away: the model's
  ``recommend(..., returning=...)``, ``inference.trending``) → ``("result", batch_id, lists,
  reasons, error)`` or
  ``("error", batch_id, text)`` when the model raised. ``reasons`` holds, per list, the reasons
  of its head when the model can explain (``inference.reasons.explain_lists``), else ``None``;
  ``error`` is the traceback when explaining raised (the lists stand, without reasons), else
  ``None``;
- ``("ping", token)`` → ``("pong", token, info)`` after a small computation on the device;
- ``("recent", counts)`` → no answer: the model's recent popularity from now on (its
  ``use_recent``, when it has one; ``inference.trending``);
- ``("stop",)`` → the worker exits.

A recommender is any object with ``recommend(histories, k) -> list[list[(item_id, score)]]``
(histories hold item ids oldest → newest; seen items are excluded). Loaders are picklable
callables so the parent can name what each child should build.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from inference.postprocess import PostConfig
from inference.reasons import explain_lists
from inference.recommender import Recommender
from inference.settings import ArtifactTrust

__all__ = ["ArtifactLoader", "worker_main"]


@dataclass(frozen=True)
class ArtifactLoader:
    """Loads a verified artifact (a folder written by ``recstream train``) in the worker.

    Picklable, so the parent passes it to spawned workers; the parent itself never loads torch.
    """

    artifact: Path
    post: PostConfig | None = None
    trust: ArtifactTrust | None = None  # None: the worker's environment

    def __call__(self) -> Recommender:
        from inference.artifact import load_recommender

        return load_recommender(self.artifact, post=self.post, trust=self.trust)


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
    """Entry point of a worker process (spawned; everything here runs in the child).

    It ignores SIGINT and SIGTERM: those go to the service's whole process group (Ctrl-C, a
    supervisor's stop), and the service drains its requests through the workers before it
    stops them with a ``stop`` message. A parent that dies closes the pipe, which ends it.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
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
    info["recent_days"] = int(getattr(model, "recent_days", 0))
    trending = getattr(model, "trending", None)
    if getattr(model, "refreshes", False) and trending is not None:
        info["recent_idle_s"] = int(trending.idle_s)
        info["recent_below"] = int(trending.below)
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
        if kind == "recent":
            use_recent = getattr(model, "use_recent", None)
            if use_recent is not None:
                try:
                    use_recent(message[1])
                except Exception:  # the model keeps the counts it had; a crash would only repeat
                    traceback.print_exc(limit=5)
            continue
        _, batch_id, histories, k, *rest = message
        returning = rest[0] if rest else None
        try:
            if returning is None:
                lists = model.recommend(histories, k)
            else:
                lists = model.recommend(histories, k, returning=returning)  # type: ignore[call-arg]
        except Exception:  # reported per batch so the parent can fall back for those requests
            conn.send(("error", batch_id, traceback.format_exc(limit=5)))
            continue
        try:
            reasons, error = explain_lists(model, histories, lists, returning), None
        except Exception:  # the lists stand without their reasons
            reasons, error = None, traceback.format_exc(limit=5)
        conn.send(("result", batch_id, lists, reasons, error))
