"""The offline lab: datasets, the evaluation protocol, CF baselines, transformer training, the
language-model reranker experiments, and the ``recstream train`` / ``recstream eval`` commands.

Nothing in a running service imports this package: the lab writes verified artifacts that
``inference`` loads. Datasets, errors and the protocol load with the package; everything that
needs torch, transformers or FAISS loads on first access.
"""

from lab.datasets import Dataset, Interaction, Item, load_dataset
from lab.exceptions import DatasetError, LabError
from recstream.lazy import lazy_exports

__all__ = [
    "EASE",
    "Dataset",
    "DatasetError",
    "Interaction",
    "Item",
    "ItemKNN",
    "LLMReranker",
    "LabError",
    "PopularityRanker",
    "Ranker",
    "RerankerConfig",
    "leave_one_out",
    "load_dataset",
    "save_artifact",
]

_LAZY = {
    "EASE": "lab.baselines",
    "ItemKNN": "lab.baselines",
    "PopularityRanker": "lab.baselines",
    "Ranker": "lab.baselines",
    "leave_one_out": "lab.protocol",
    "save_artifact": "lab.artifact",
    "LLMReranker": "lab.reranker",
    "RerankerConfig": "lab.reranker",
}


__getattr__ = lazy_exports("lab", _LAZY)
