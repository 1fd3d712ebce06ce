"""Nearest-neighbour retrieval over item embeddings with FAISS.

Vectors are L2-normalised, so inner product is cosine similarity. Small catalogs use an exact
``IndexFlatIP`` (a 50k-vector flat search takes a few milliseconds on this machine); large ones can
use an approximate HNSW graph. The index keeps the mapping from FAISS row to item id and is saved
beside it, so a loaded index answers in item ids. Searches are batched, and exclusions (items a user
has seen) are applied per query by over-fetching, so a row never contains an excluded item.

FAISS work is CPU-bound: run it in a worker, never on an event loop.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from inference.exceptions import ArtifactError, InferenceError

__all__ = ["FLAT_LIMIT", "IndexKind", "ItemIndex"]

IndexKind = Literal["auto", "flat", "hnsw"]
FLAT_LIMIT = 200_000  # above this many items "auto" picks HNSW
INDEX_FILE = "items.faiss"
IDS_FILE = "item_ids.json"


def _as_matrix(vectors: npt.ArrayLike, dim: int | None = None) -> npt.NDArray[np.float32]:
    matrix = np.ascontiguousarray(np.atleast_2d(np.asarray(vectors, dtype=np.float32)))
    if matrix.ndim != 2 or (dim is not None and matrix.shape[1] != dim):
        raise InferenceError(f"expected vectors of dimension {dim}, got shape {matrix.shape}")
    if not np.all(np.isfinite(matrix)):
        raise InferenceError("vectors contain NaN or infinity")
    return matrix


class ItemIndex:
    """Item ids and a FAISS inner-product index over their embeddings."""

    def __init__(self, index: Any, item_ids: Sequence[str], kind: str) -> None:
        if index.ntotal != len(item_ids):
            raise InferenceError(f"index holds {index.ntotal} vectors for {len(item_ids)} ids")
        self._index = index
        self.item_ids = list(item_ids)
        self.kind = kind
        self._pos = {item_id: pos for pos, item_id in enumerate(self.item_ids)}
        if len(self._pos) != len(self.item_ids):
            raise InferenceError("item ids are not unique")

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._pos

    @classmethod
    def build(
        cls,
        item_ids: Sequence[str],
        vectors: npt.ArrayLike,
        kind: IndexKind = "auto",
        *,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
    ) -> ItemIndex:
        """Index ``vectors`` (row ``i`` is ``item_ids[i]``); exact flat or approximate HNSW."""
        import faiss

        matrix = _as_matrix(vectors)
        if matrix.shape[0] != len(item_ids):
            raise InferenceError(f"{matrix.shape[0]} vectors for {len(item_ids)} item ids")
        chosen = kind if kind != "auto" else ("flat" if len(item_ids) <= FLAT_LIMIT else "hnsw")
        dim = matrix.shape[1]
        index: Any
        if chosen == "flat":
            index = faiss.IndexFlatIP(dim)
        elif chosen == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        else:
            raise InferenceError(f"unknown index kind {kind!r}")
        index.add(matrix)
        return cls(index, item_ids, chosen)

    def vectors(self, item_ids: Sequence[str]) -> npt.NDArray[np.float32]:
        """The stored embeddings of ``item_ids`` (an unknown id is an error)."""
        try:
            rows = [self._pos[i] for i in item_ids]
        except KeyError as exc:
            raise InferenceError(f"item {exc.args[0]!r} is not in the index") from exc
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        for n, row in enumerate(rows):
            out[n] = self._index.reconstruct(row)
        return out

    def search(
        self,
        query_vectors: npt.ArrayLike,
        k: int,
        exclude: Sequence[Collection[str]] | None = None,
    ) -> tuple[list[list[str]], list[npt.NDArray[np.float32]]]:
        """The ``k`` best items for each query row, best first, as ``(ids, scores)``.

        ``exclude[i]`` holds item ids never returned for query ``i``. A row is shorter than ``k``
        only when the catalog minus its exclusions has fewer than ``k`` items (or, for HNSW, the
        graph search reaches fewer).
        """
        queries = _as_matrix(query_vectors, self.dim)
        if exclude is not None and len(exclude) != len(queries):
            raise InferenceError(f"{len(exclude)} exclusion sets for {len(queries)} queries")
        if k <= 0 or len(queries) == 0:
            return [[] for _ in queries], [np.zeros(0, np.float32) for _ in queries]
        excl = [set(e) for e in exclude] if exclude is not None else [set() for _ in queries]
        # The flat index is exact, so k + |excluded| rows always hold k allowed ones.
        fetch = min(len(self), k + max((len(e & self._pos.keys()) for e in excl), default=0))
        if self.kind == "hnsw":
            self._index.hnsw.efSearch = max(int(self._index.hnsw.efSearch), fetch)
        scores, rows = self._index.search(queries, fetch)
        ids_out: list[list[str]] = []
        scores_out: list[npt.NDArray[np.float32]] = []
        for q in range(len(queries)):
            keep_ids: list[str] = []
            keep_scores: list[float] = []
            for row, score in zip(rows[q], scores[q], strict=True):
                if row < 0:
                    break  # FAISS pads missing results with -1
                item_id = self.item_ids[row]
                if item_id in excl[q]:
                    continue
                keep_ids.append(item_id)
                keep_scores.append(float(score))
                if len(keep_ids) == k:
                    break
            ids_out.append(keep_ids)
            scores_out.append(np.asarray(keep_scores, dtype=np.float32))
        return ids_out, scores_out

    def save(self, folder: Path) -> None:
        """Write ``items.faiss`` and ``item_ids.json`` into ``folder``."""
        import faiss

        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(folder / INDEX_FILE))
        meta = {"kind": self.kind, "dim": self.dim, "item_ids": self.item_ids}
        (folder / IDS_FILE).write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> ItemIndex:
        """Read an index written by :meth:`save`; each file is read once, then parsed.

        An artifact's index is loaded with :meth:`from_bytes` from the verified bytes instead.
        """
        index_path, ids_path = folder / INDEX_FILE, folder / IDS_FILE
        if not index_path.is_file() or not ids_path.is_file():
            raise ArtifactError(f"{folder} lacks {INDEX_FILE} or {IDS_FILE}")
        return cls.from_bytes(index_path.read_bytes(), ids_path.read_bytes())

    @classmethod
    def from_bytes(cls, index_bytes: bytes, ids_bytes: bytes) -> ItemIndex:
        """An index from the bytes of ``items.faiss`` and ``item_ids.json`` (no file opened)."""
        import faiss

        try:
            meta = json.loads(ids_bytes)
            item_ids = [str(i) for i in meta["item_ids"]]
            kind = str(meta["kind"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{IDS_FILE} is malformed: {exc}") from exc
        try:
            index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
        except RuntimeError as exc:
            raise ArtifactError(f"{INDEX_FILE} is malformed: {exc}") from exc
        if int(index.d) != int(meta.get("dim", index.d)):
            raise ArtifactError(f"{INDEX_FILE} has dimension {index.d}, {IDS_FILE} says otherwise")
        return cls(index, item_ids, kind)
