"""Models and their serving: datasets, the evaluation protocol, CF baselines, the generative
transformer, the language-model reranker, item embeddings and FAISS, artifacts, the worker pool.

Datasets, errors and the protocol load with the package; everything that needs torch,
transformers or FAISS loads on first access, so services that only read data stay light.
"""

from importlib import import_module
from typing import Any

from inference.datasets import Dataset, Interaction, Item, load_dataset
from inference.exceptions import ArtifactError, DatasetError, InferenceError

__all__ = [
    "EASE",
    "ArtifactError",
    "Dataset",
    "DatasetError",
    "GaussianMechanism",
    "InferenceError",
    "Interaction",
    "Item",
    "ItemIndex",
    "ItemKNN",
    "LLMReranker",
    "Popularity",
    "Recommender",
    "RerankerConfig",
    "WorkerPool",
    "embed_items",
    "leave_one_out",
    "load_dataset",
    "load_recommender",
    "postprocess",
    "profile_embedding",
    "save_artifact",
    "verify_manifest",
    "write_manifest",
]

_LAZY = {
    "EASE": "inference.models",
    "ItemKNN": "inference.models",
    "Popularity": "inference.models",
    "Recommender": "inference.models",
    "leave_one_out": "inference.protocol",
    "load_recommender": "inference.artifact",
    "save_artifact": "inference.artifact",
    "ItemIndex": "inference.index",
    "LLMReranker": "inference.reranker",
    "RerankerConfig": "inference.reranker",
    "embed_items": "inference.embeddings",
    "profile_embedding": "inference.embeddings",
    "GaussianMechanism": "inference.privacy",
    "postprocess": "inference.postprocess",
    "verify_manifest": "inference.integrity",
    "write_manifest": "inference.integrity",
    "WorkerPool": "inference.pool",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'inference' has no attribute {name!r}")
    return getattr(import_module(module), name)
