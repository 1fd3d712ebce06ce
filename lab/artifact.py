"""Writing a trained-model artifact: the folder that ``inference.artifact`` loads and verifies.

See :mod:`inference.artifact` for the format; the file names and format number are defined there,
the manifest in :mod:`inference.integrity`, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.artifact import (
    ARTIFACT_FORMAT,
    CF_FILE,
    CONFIG_FILE,
    DEFAULT_CF_TOP_K,
    INDEX_DIR,
    ITEMS_FILE,
    TRAINING_FILE,
    WEIGHTS_FILE,
)
from inference.exceptions import ArtifactError
from inference.integrity import signing_key, verify_manifest, write_manifest
from inference.retrieval import RetrievalConfig
from inference.settings import ArtifactSigning, ArtifactTrust
from inference.trending import TrendingConfig
from lab.baselines import EASE, ItemKNN
from lab.hybrid import Fusion, Hybrid
from lab.protocol import Split

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ["save_artifact", "sign_artifact"]


def save_artifact(
    folder: Path,
    model: Any,
    split: Split,
    training_log: dict[str, Any],
    *,
    text_embeddings: np.ndarray | None = None,
    hybrid: Hybrid | Fusion | None = None,
    cf_top_k: int = DEFAULT_CF_TOP_K,
    retrieval: RetrievalConfig | None = None,
    trending: TrendingConfig | None = None,
    key: Ed25519PrivateKey | None = None,
) -> str:
    """Write a complete artifact for ``model`` (an ``ItemTransformer``); return its version.

    ``hybrid`` (fitted, its ``cf`` an :class:`~lab.baselines.EASE` on the same split) adds
    ``cf.safetensors`` and the config's ``"hybrid"`` section. A fitted :class:`~lab.hybrid.Fusion`
    (the transformer, EASE, item-kNN, popularity) writes the arrays of each CF component of
    non-zero weight to ``cf.safetensors`` and a ``"hybrid"`` section with ``"fusion"`` (the
    weights), each component's parameters, validation NDCG@10 and the weight search's trace.
    ``retrieval`` (fitted by :func:`lab.hybrid.fit_retrieval`; needs ``text_embeddings`` for the
    index it searches) adds the config's ``"retrieval"`` section, which serving reads;
    ``trending`` (chosen by :func:`lab.evaluate.choose_trending` on held-out users) its
    ``"trending"`` section, the recent-popularity blend of short histories. The
    manifest is signed with ``key``, by default the signing key of the environment
    (``RECSTREAM_ARTIFACT_SIGNING_KEY`` or ``..._FILE``); with none configured the artifact is
    unsigned, and services refuse it unless they allow unsigned artifacts.
    """
    if key is None:
        key = signing_key(ArtifactSigning())
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        raise ArtifactError(f"{folder} is not empty; give a new --out folder per training run")
    data_digest = "".join(f"{k}:{v};" for k, v in sorted(split.sha256.items()))
    version = (
        f"gen-{split.dataset}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
        f"{hashlib.sha256(data_digest.encode()).hexdigest()[:8]}"
    )
    config: dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "version": version,
        "model": "gen",
        "dataset": split.dataset,
        "gen": model.cfg.to_json(),
    }
    if isinstance(hybrid, Fusion):
        config["model"] = hybrid.name
        config["hybrid"] = _save_fusion(folder, hybrid, split, cf_top_k)
    elif hybrid is not None:
        config["model"] = "gen+ease"
        config["hybrid"] = _save_cf(folder, hybrid, split, cf_top_k)
    if retrieval is not None:
        if retrieval.active and text_embeddings is None:
            raise ArtifactError("retrieval needs the item index: pass text_embeddings")
        config["retrieval"] = retrieval.to_json()
    if trending is not None:
        config["trending"] = trending.to_json()
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
        key,
    )
    return version


def sign_artifact(folder: Path, key: Ed25519PrivateKey, trust: ArtifactTrust) -> None:
    """Sign an existing artifact with ``key`` (a key rotation, or a legacy unsigned artifact).

    The artifact must first pass :func:`~inference.integrity.verify_manifest` under ``trust``
    (allow unsigned only to adopt an artifact made before signing), so a tampered folder is
    never blessed; the manifest is rewritten only if every file still has its verified hash.
    """
    verified = verify_manifest(folder, trust)
    extra = {k: v for k, v in verified.manifest.items() if k not in {"files", "manifest_version"}}
    written = json.loads(write_manifest(folder, extra, key).read_text(encoding="utf-8"))
    if written["files"] != verified.manifest["files"]:
        write_manifest(folder, extra)  # unsigned again: changed between the check and signing
        raise ArtifactError(f"{folder} changed while it was being signed; not signed")


def _save_cf(folder: Path, hybrid: Hybrid, split: Split, top_k: int) -> dict[str, Any]:
    """Write ``cf.safetensors``; return the config's ``"hybrid"`` section."""
    from safetensors.numpy import save_file

    ease = hybrid.cf
    if not isinstance(ease, EASE):
        raise ArtifactError(f"the hybrid's CF part must be EASE, not {type(ease).__name__}")
    if ease.n_items != split.n_items:
        raise ArtifactError("the hybrid's CF part was not fitted on this split's catalog")
    if top_k < 1:
        raise ArtifactError(f"cf top_k must be at least 1, not {top_k}")
    save_file(ease.to_arrays(top_k), str(folder / CF_FILE), metadata={"layout": "ease=csc"})
    valid = hybrid.valid_ndcg
    return {
        "cf": "ease",
        "alpha": float(hybrid.alpha),
        "params": {
            "lam": float(ease.lam),
            "decay": float(ease.decay),
            "beta": float(ease.beta),
            "markov_last": int(ease.markov_last),
        },
        "top_k": int(top_k),
        # alpha 1 is the transformer alone, alpha 0 EASE alone (standardising keeps the order).
        "valid_ndcg@10": {
            "gen": valid.get(1.0),
            "ease": valid.get(0.0),
            "hybrid": valid.get(hybrid.alpha),
        },
    }


def _save_fusion(folder: Path, fusion: Fusion, split: Split, top_k: int) -> dict[str, Any]:
    """Write the fusion's CF arrays to ``cf.safetensors``; return the config's ``"hybrid"``."""
    from safetensors.numpy import save_file

    if fusion.n_items != split.n_items:
        raise ArtifactError("the fusion was not fitted on this split's catalog")
    if top_k < 1:
        raise ArtifactError(f"cf top_k must be at least 1, not {top_k}")
    used = {n for n, w in fusion.weights.items() if w > 0.0}
    arrays: dict[str, np.ndarray] = {}
    section: dict[str, Any] = {"fusion": {n: float(w) for n, w in fusion.weights.items()}}
    if "ease" in used:
        ease = fusion.components["ease"]
        if not isinstance(ease, EASE):
            raise ArtifactError(f"the fusion's ease must be EASE, not {type(ease).__name__}")
        arrays.update(ease.to_arrays(top_k))
        section["ease"] = {
            "lam": float(ease.lam),
            "decay": float(ease.decay),
            "beta": float(ease.beta),
            "markov_last": int(ease.markov_last),
            "max_items": int(ease.max_items),
        }
        section["top_k"] = int(top_k)
    if "itemknn" in used:
        knn = fusion.components["itemknn"]
        if not isinstance(knn, ItemKNN):
            raise ArtifactError(f"the fusion's itemknn must be ItemKNN, not {type(knn).__name__}")
        arrays.update(knn.to_arrays())
        section["itemknn"] = {"k_neighbours": int(knn.k_neighbours), "decay": float(knn.decay)}
    if arrays:
        save_file(arrays, str(folder / CF_FILE), metadata={"layout": "ease=csc,itemknn=csr"})
    summary = fusion.summary()
    section["valid_ndcg@10"] = summary["valid_ndcg@10"]
    section["fit_users"] = summary["fit_users"]
    section["search"] = summary["trace"]
    return section
