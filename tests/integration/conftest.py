"""Fixtures shared by the integration tests.

- ``workers``: starts stream workers (real processes) of one group, in each delivery mode.
- ``tiny_artifact`` / ``train_tiny_artifact``: the regeneration service serves only a verified
  artifact, so the tests that run it train a tiny one once on a slice of ML-100K (seconds on a CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from inference.trending import TrendingConfig
from tests.conftest import Namespace
from tests.integration.streams_support import Worker


@pytest.fixture(params=["agent", "batch"])
def workers(
    ns: Namespace, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Worker]]:
    """Starts workers of one group in one delivery mode (each test runs in both); stops them."""
    started: list[Worker] = []

    def start(**env: str) -> Worker:
        env = {"RECSTREAM_STREAMS_DELIVERY": request.param, **env}
        worker = Worker(ns.settings, ns.group("streams"), tmp_path, env).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def train_tiny_artifact(
    folder: Path,
    *,
    with_index: bool = False,
    with_ease: bool = False,
    trending: TrendingConfig | None = None,
) -> Path:
    """Train the tiny transformer (100 ML-100K users, one epoch) into ``folder``, signed with the
    session's key; ``with_index`` adds the MiniLM item index (retrieval, private embeddings),
    ``with_ease`` serves it mixed half and half with EASE (a model whose lists have reasons),
    ``trending`` blends recent popularity into short histories' lists."""
    from inference.generative import GenConfig, GenScorer
    from lab.artifact import save_artifact
    from lab.baselines import EASE
    from lab.datasets import Dataset, load_dataset
    from lab.hybrid import Hybrid
    from lab.protocol import leave_one_out
    from lab.training import train_gen
    from recstream.settings import CommonSettings

    full = load_dataset("ml-100k", CommonSettings().data_dir)
    keep = set(full.users[:100])
    kept = [it for it in full.interactions if it.user_id in keep]
    split = leave_one_out(Dataset("ml-100k-head", kept, full.items, dict(full.sha256)))
    cfg = GenConfig(hidden=16, layers=1, heads=2, ffn=32, max_len=20, batch_size=64, epochs=1)
    model, log = train_gen(split, cfg, progress=False, say=lambda _: None)
    vectors = _vectors(tuple(split.item_ids)) if with_index else None
    hybrid = None
    if with_ease:
        ease = EASE(lam=100.0, decay=0.9, beta=0.3, markov_last=3).fit(split)
        hybrid = Hybrid(ease, GenScorer(model, model.cfg)).fit(split)
        hybrid.alpha = 0.5  # both parts serve, whatever validation picked for one epoch
    save_artifact(
        folder, model, split, dict(log), text_embeddings=vectors, hybrid=hybrid, trending=trending
    )
    return folder


@functools.cache
def _vectors(item_ids: tuple[str, ...]) -> np.ndarray:
    """The MiniLM item vectors of ``item_ids`` (ML-100K's titles), encoded once per session:
    the artifacts with an index share them (encoding is most of their training's time)."""
    from inference.embeddings import catalog_vectors
    from lab.datasets import load_dataset
    from recstream.settings import CommonSettings

    items = load_dataset("ml-100k", CommonSettings().data_dir).items
    vectors = catalog_vectors(list(item_ids), items)
    vectors.flags.writeable = False  # shared: no artifact may change another's
    return vectors


@pytest.fixture(scope="session")
def hybrid_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_artifact(tmp_path_factory.mktemp("hybrid-artifact") / "gen", with_ease=True)


@pytest.fixture(scope="session")
def trending_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    blend = TrendingConfig(days=30, weight=16.0, below=4)
    return train_tiny_artifact(tmp_path_factory.mktemp("trending-artifact") / "gen", trending=blend)


@pytest.fixture(scope="session")
def returning_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    blend = TrendingConfig(days=30, weight=16.0, below=4, idle_s=3_600)
    folder = tmp_path_factory.mktemp("returning-artifact") / "gen"
    return train_tiny_artifact(folder, trending=blend)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_artifact(tmp_path_factory.mktemp("tiny-artifact") / "gen")
