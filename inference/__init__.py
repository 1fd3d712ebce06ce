"""Serving: verified artifacts, the worker pool and its workers, retrieval, post-processing.

Errors load with the package; everything that needs torch, transformers or FAISS loads on first
access, so services that only read data stay light. Training and evaluation live in ``lab``.
"""

from inference.exceptions import ArtifactError, InferenceError
from inference.recommender import Ranked, Recommender
from recstream.lazy import lazy_exports

__all__ = [
    "ArtifactError",
    "GaussianMechanism",
    "InferenceError",
    "ItemIndex",
    "Popularity",
    "PostConfig",
    "Ranked",
    "Recommender",
    "WorkerPool",
    "embed_items",
    "load_recommender",
    "postprocess",
    "profile_embedding",
    "read_catalog",
    "verify_manifest",
    "write_manifest",
]

_LAZY = {
    "load_recommender": "inference.artifact",
    "read_catalog": "inference.artifact",
    "Popularity": "inference.popularity",
    "PostConfig": "inference.postprocess",
    "ItemIndex": "inference.index",
    "embed_items": "inference.embeddings",
    "profile_embedding": "inference.embeddings",
    "GaussianMechanism": "inference.privacy",
    "postprocess": "inference.postprocess",
    "verify_manifest": "inference.integrity",
    "write_manifest": "inference.integrity",
    "WorkerPool": "inference.pool",
}


__getattr__ = lazy_exports("inference", _LAZY)
