"""Trained-model artifacts: write one folder per training run, load it back verified.

An artifact folder holds ``config.json`` (architecture, training settings, version, dataset),
``model.safetensors`` (weights), ``items.json`` (the item vocabulary in token order and training
popularity), ``training.json`` (the run's log), the FAISS index of the items' text embeddings
(``index/``, when built) and ``manifest.json`` with the SHA-256 of every file and of the training
data. :func:`load_recommender` verifies the manifest first and raises :class:`ArtifactError` on a
missing, altered or extra file, so a tampered model is never served.

Inference runs on CUDA in bf16 when a GPU is present, otherwise on CPU with INT8 dynamic
quantization of every linear layer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from inference.exceptions import ArtifactError
from inference.integrity import verify_manifest, write_manifest
from inference.protocol import Split

__all__ = ["ARTIFACT_FORMAT", "ArtifactRecommender", "load_recommender", "save_artifact"]

ARTIFACT_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ITEMS_FILE = "items.json"
TRAINING_FILE = "training.json"
INDEX_DIR = "index"


def save_artifact(
    folder: Path,
    model: Any,
    split: Split,
    training_log: dict[str, Any],
    *,
    text_embeddings: np.ndarray | None = None,
) -> str:
    """Write a complete artifact for ``model`` (an ``ItemTransformer``); return its version."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise ArtifactError(f"{folder} is not empty; give a new --out folder per training run")
    data_digest = "".join(f"{k}:{v};" for k, v in sorted(split.sha256.items()))
    import hashlib

    version = (
        f"gen-{split.dataset}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
        f"{hashlib.sha256(data_digest.encode()).hexdigest()[:8]}"
    )
    config = {
        "format": ARTIFACT_FORMAT,
        "version": version,
        "model": "gen",
        "dataset": split.dataset,
        "gen": model.cfg.to_json(),
    }
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_model(model, str(folder / WEIGHTS_FILE))
    popularity = np.bincount(np.concatenate(split.train), minlength=split.n_items)
    items = {"item_ids": split.item_ids, "popularity": popularity.tolist()}
    (folder / ITEMS_FILE).write_text(json.dumps(items), encoding="utf-8")
    (folder / TRAINING_FILE).write_text(json.dumps(training_log, indent=2), encoding="utf-8")
    if text_embeddings is not None:
        from inference.index import ItemIndex

        ItemIndex.build(split.item_ids, text_embeddings).save(folder / INDEX_DIR)
    write_manifest(
        folder,
        {"version": version, "dataset": split.dataset, "training_data_sha256": split.sha256},
    )
    return version


class ArtifactRecommender:
    """A loaded artifact behind the serving interface (item-id strings in and out)."""

    name = "gen"

    def __init__(self, folder: Path, device: str | None = None, quantize: bool = True) -> None:
        import torch
        from safetensors.torch import load_model

        from inference.generative import GenConfig, GenRecommender, ItemTransformer, quantize_int8

        self.manifest = verify_manifest(folder)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
            items = json.loads((folder / ITEMS_FILE).read_text(encoding="utf-8"))
            cfg = GenConfig.from_json(config["gen"])
            self.item_ids: list[str] = [str(i) for i in items["item_ids"]]
            popularity = np.asarray(items["popularity"], dtype=np.float32)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{folder} has a malformed config or vocabulary: {exc}") from exc
        if config.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(f"{folder} has artifact format {config.get('format')!r}")
        if len(self.item_ids) != cfg.n_items or len(popularity) != cfg.n_items:
            raise ArtifactError(f"{folder}: vocabulary size does not match the model")
        self.version = str(config["version"])
        self.dataset = str(config["dataset"])
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self._popularity = popularity
        base = ItemTransformer(cfg)
        load_model(base, str(folder / WEIGHTS_FILE))
        model: torch.nn.Module = base.eval()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        dtype = None
        if self.device.type == "cuda":
            model = model.to(self.device)
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            self.precision = str(dtype).removeprefix("torch.")
        elif quantize:
            model = quantize_int8(model)
            self.precision = "int8"
        else:
            self.precision = "fp32"
        self.scorer = GenRecommender(
            model, cfg, device=str(self.device), dtype=dtype, precision=self.precision
        )
        self.n_items = cfg.n_items

    def to_indices(self, history: list[str]) -> np.ndarray:
        """Catalog indices of a history; unknown ids are skipped (they cannot be scored)."""
        return np.asarray([self.index[i] for i in history if i in self.index], dtype=np.int64)

    def recommend(self, histories: list[list[str]], k: int) -> list[list[tuple[str, float]]]:
        """Top ``k`` catalog items per history (oldest→newest ids), seen items excluded.

        A history with no known item gets the training popularity ranking.
        """
        from inference.models import top_k_unseen

        known = [self.to_indices(h) for h in histories]
        out: list[list[tuple[str, float]]] = [[] for _ in histories]
        rows = [r for r, h in enumerate(known) if len(h)]
        scores = np.tile(self._popularity, (len(histories), 1))
        if rows:
            scores[rows] = self.scorer.score([known[r] for r in rows])
        top, vals = top_k_unseen(scores, known, k)
        for r in range(len(histories)):
            for i, v in zip(top[r], vals[r], strict=True):
                if not np.isfinite(v):
                    break  # fewer unseen items than k
                # By construction an index is a catalog position; checked because serving
                # anything else would be a silent corruption.
                if not 0 <= i < self.n_items:
                    raise ArtifactError(f"model produced index {i} outside the catalog")
                out[r].append((self.item_ids[i], float(v)))
        return out


def load_recommender(
    folder: str | Path, device: str | None = None, quantize: bool = True
) -> ArtifactRecommender:
    """Verify and load an artifact written by ``recstream train``."""
    path = Path(folder)
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} does not exist")
    return ArtifactRecommender(path, device=device, quantize=quantize)
