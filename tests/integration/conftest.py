"""Fixtures of the integration tests that start the regeneration service as a process.

The service serves only a verified artifact, so the tests that run it (`recstream run`, the
metrics endpoints) train a tiny one once per session on a slice of ML-100K: seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.generative import GenConfig
    from lab.artifact import save_artifact
    from lab.datasets import Dataset, load_dataset
    from lab.protocol import leave_one_out
    from lab.training import train_gen
    from recstream.settings import CommonSettings

    full = load_dataset("ml-100k", CommonSettings().data_dir)
    keep = set(full.users[:100])
    kept = [it for it in full.interactions if it.user_id in keep]
    split = leave_one_out(Dataset("ml-100k-head", kept, full.items, dict(full.sha256)))
    cfg = GenConfig(hidden=16, layers=1, heads=2, ffn=32, max_len=20, batch_size=64, epochs=1)
    model, log = train_gen(split, cfg, progress=False, say=lambda _: None)
    folder = tmp_path_factory.mktemp("tiny-artifact") / "gen"
    save_artifact(folder, model, split, dict(log))
    return folder
