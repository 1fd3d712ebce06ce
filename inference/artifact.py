"""Trained-model artifacts: load the folder of one training run, verified, and serve it.

An artifact folder holds ``config.json`` (architecture, training settings, version, dataset),
``model.safetensors`` (weights), ``items.json`` (the item vocabulary in token order and training
popularity), ``training.json`` (the run's log), the FAISS index of the items' text embeddings
(``index/``, when built) and ``manifest.json`` with the SHA-256 of every file and of the training
data, and ``manifest.sig``, its Ed25519 signature. :func:`load_recommender` verifies the signature
and the manifest first and raises :class:`ArtifactError` on an unsigned (unless allowed) or
mis-signed manifest and on a missing, altered or extra file, so a tampered model is never served;
every file is read once, and the model is built from those verified bytes, never reopened. The
lab writes the folder (``lab.artifact.save_artifact``) with the file names defined here.

An artifact of the ``gen+ease`` hybrid also holds ``cf.safetensors`` (EASE's item-item weights
pruned to the largest ``top_k`` per column, CSC arrays, and its Markov transitions, CSR arrays)
and a ``"hybrid"`` section in ``config.json`` (``cf``, ``alpha``, EASE's parameters, ``top_k``,
validation NDCG@10 of each part). Loaded with ``hybrid=True`` (the default) it serves
``inference.hybrid.mix`` of both; an artifact without the section serves the transformer alone.
A ``"retrieval"`` section (``weight``, ``max_history``; fitted on validation by the lab) adds the
FAISS neighbours of a short history's items to the model's scores (``inference.retrieval``); it
needs the artifact's ``index/``. A ``"trending"`` section (``days``, ``weight``, ``below``; chosen
by the lab on held-out users) blends recent popularity into the scores of histories shorter than
``below``, in place of retrieval, once the service hands the model the live counts
(:meth:`ArtifactRecommender.use_recent`, ``inference.trending``).

Inference runs on CUDA in bf16 when a GPU is present, otherwise on CPU with INT8 dynamic
quantization of every linear layer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference.exceptions import ArtifactError, InferenceError
from inference.hybrid import fuse
from inference.integrity import VerifiedArtifact, verify_manifest
from inference.popularity import Popularity
from inference.postprocess import CatalogPost, PostConfig
from inference.reasons import weight_reasons
from inference.retrieval import RetrievalBlend, RetrievalConfig, TextRetrieval
from inference.scoring import (
    CatalogScorer,
    EaseScorer,
    ItemKNNScorer,
    PopularityScorer,
    top_k_unseen,
)
from inference.settings import ArtifactTrust
from inference.trending import TrendingConfig, blend_recent, recent_counts, recent_feature
from schemas.messages import POPULAR_MIN_USERS

if TYPE_CHECKING:
    from inference.index import ItemIndex

__all__ = [
    "ARTIFACT_FORMAT",
    "ArtifactCatalog",
    "ArtifactRecommender",
    "load_recommender",
    "read_catalog",
    "read_item_index",
    "read_trending",
]

ARTIFACT_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
ITEMS_FILE = "items.json"
TRAINING_FILE = "training.json"
INDEX_DIR = "index"
CF_FILE = "cf.safetensors"
DEFAULT_CF_TOP_K = 256
FUSED = ("gen", "ease", "itemknn", "pop")  # the parts a fusion may weight, in naming order


@dataclass(frozen=True)
class ArtifactCatalog:
    """What a service needs from an artifact without loading the model: its catalog and popularity.

    ``popularity`` is the training popularity stored in ``items.json``: the pool's fallback, and
    its head is the warm-up history.
    """

    version: str
    item_ids: list[str]
    popularity: Popularity


def _verified(folder: str | Path, trust: ArtifactTrust | None) -> VerifiedArtifact:
    """The artifact folder, verified (its manifest, signature and every file's hash)."""
    path = Path(folder)
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} does not exist")
    return verify_manifest(path, trust)


def read_catalog(folder: str | Path, trust: ArtifactTrust | None = None) -> ArtifactCatalog:
    """Verify the artifact and read its vocabulary and training popularity (no torch).

    ``trust`` (the verify keys, whether unsigned is allowed) defaults to the environment's.
    """
    verified = _verified(folder, trust)
    path = verified.folder
    try:
        config = json.loads(verified.read(CONFIG_FILE))
        items = json.loads(verified.read(ITEMS_FILE))
        item_ids = [str(i) for i in items["item_ids"]]
        counts = [int(n) for n in items["popularity"]]
        version = str(config["version"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path} has a malformed config or vocabulary: {exc}") from exc
    if len(counts) != len(item_ids):
        raise ArtifactError(f"{path}: popularity does not match the vocabulary")
    return ArtifactCatalog(version, item_ids, Popularity(dict(zip(item_ids, counts, strict=True))))


def read_item_index(folder: str | Path, trust: ArtifactTrust | None = None) -> ItemIndex:
    """Verify the artifact and build its FAISS item index from the verified bytes (no torch)."""
    return _item_index(_verified(folder, trust))


def read_trending(folder: str | Path, trust: ArtifactTrust | None = None) -> TrendingConfig:
    """Verify the artifact and read its served recent-popularity blend (no torch; off without
    its section)."""
    verified = _verified(folder, trust)
    path = verified.folder
    try:
        config = json.loads(verified.read(CONFIG_FILE))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path} has a malformed config: {exc}") from exc
    if not isinstance(config, dict):
        raise ArtifactError(f"{path} has a malformed config: not an object")
    return _trending_config(config, path)


def _item_index(verified: VerifiedArtifact) -> ItemIndex:
    from inference.index import IDS_FILE, INDEX_FILE, ItemIndex

    index_file, ids_file = f"{INDEX_DIR}/{INDEX_FILE}", f"{INDEX_DIR}/{IDS_FILE}"
    if not (verified.has(index_file) and verified.has(ids_file)):
        raise ArtifactError(f"{verified.folder} has no item index ({INDEX_DIR}/)")
    return ItemIndex.from_bytes(verified.read(index_file), verified.read(ids_file))


def _load_cf(
    verified: VerifiedArtifact, section: dict[str, Any], n_items: int
) -> tuple[EaseScorer, float]:
    """The pruned EASE model and ``alpha`` of a hybrid artifact."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    folder = verified.folder
    try:
        if section.get("cf") != "ease":
            raise ValueError(f"unknown CF model {section.get('cf')!r}")
        alpha = float(section["alpha"])
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha {alpha} outside [0, 1]")
        params = section["params"]
        cf = EaseScorer.from_arrays(
            load(verified.read(CF_FILE)),
            n_items,
            lam=float(params["lam"]),
            decay=float(params["decay"]),
            beta=float(params["beta"]),
            markov_last=int(params["markov_last"]),
        )
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ArtifactError(f"{folder} has a malformed hybrid section or {CF_FILE}: {exc}") from exc
    return cf, alpha


def _load_fusion(
    verified: VerifiedArtifact, section: dict[str, Any], n_items: int, popularity: np.ndarray
) -> tuple[dict[str, float], dict[str, CatalogScorer]]:
    """The weights and CF scorers of a fusion artifact (the transformer is loaded apart)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        weights = {str(n): float(w) for n, w in section["fusion"].items()}
        if set(weights) - set(FUSED) or any(not 0.0 <= w <= 1.0 for w in weights.values()):
            raise ValueError(f"bad fusion weights {weights}")
        if not any(w > 0.0 for w in weights.values()):
            raise ValueError("no fusion weight is positive")
        used = {n for n, w in weights.items() if w > 0.0}
        arrays = load(verified.read(CF_FILE)) if used & {"ease", "itemknn"} else {}
        parts: dict[str, CatalogScorer] = {}
        if "ease" in used:
            p = section["ease"]
            parts["ease"] = EaseScorer.from_arrays(
                arrays,
                n_items,
                lam=float(p["lam"]),
                decay=float(p["decay"]),
                beta=float(p["beta"]),
                markov_last=int(p["markov_last"]),
            )
        if "itemknn" in used:
            parts["itemknn"] = ItemKNNScorer.from_arrays(
                arrays, n_items, decay=float(section["itemknn"]["decay"])
            )
        if "pop" in used:
            parts["pop"] = PopularityScorer(popularity)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise ArtifactError(
            f"{verified.folder} has a malformed fusion section or {CF_FILE}: {exc}"
        ) from exc
    return weights, parts


def _load_weights(model: Any, verified: VerifiedArtifact) -> None:
    """Load ``model.safetensors``'s verified bytes into ``model`` (strict, tied weights allowed).

    safetensors stores a tied tensor once (the output layer shares the item embeddings), so a
    name may be missing only when it shares storage with one that was loaded.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(verified.read(WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, RuntimeError, ValueError) as exc:
        path = verified.folder / WEIGHTS_FILE
        raise ArtifactError(f"{path} does not fit the model: {exc}") from exc
    params = model.state_dict()
    loaded = {params[name].data_ptr() for name in state if name in params}
    untied = [name for name in missing if params[name].data_ptr() not in loaded]
    if unexpected or untied:
        raise ArtifactError(
            f"{verified.folder / WEIGHTS_FILE} does not fit the model: "
            f"missing {untied}, unexpected {list(unexpected)}"
        )


class ArtifactRecommender:
    """A loaded artifact behind the serving interface (item-id strings in and out).

    ``name`` is ``gen+ease`` when the hybrid is served, else ``gen``; ``scorer`` is always the
    transformer alone and ``cf`` the pruned EASE model (``None`` without the hybrid).
    ``retrieval`` is the served retrieval config (inactive without the artifact's section, or
    with ``retrieval=False``): histories shorter than its ``max_history`` get the FAISS
    neighbours of their items blended in; the name stays the model's. ``trending`` is the served
    recent-popularity config (inactive without the artifact's section): once
    :meth:`use_recent` gave the live counts, histories shorter than its ``below`` get them
    blended in.
    """

    def __init__(
        self,
        folder: Path,
        device: str | None = None,
        quantize: bool = True,
        hybrid: bool = True,
        post: PostConfig | None = None,
        *,
        retrieval: bool = True,
        trust: ArtifactTrust | None = None,
    ) -> None:
        import torch

        from inference.generative import GenConfig, GenScorer, ItemTransformer, quantize_int8

        verified = verify_manifest(folder, trust)
        self.manifest = verified.manifest
        self.signed_by = verified.signed_by
        try:
            config = json.loads(verified.read(CONFIG_FILE))
            items = json.loads(verified.read(ITEMS_FILE))
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
        _load_weights(base, verified)
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
        self.scorer = GenScorer(
            model, cfg, device=str(self.device), dtype=dtype, precision=self.precision
        )
        self.n_items = cfg.n_items
        self.cf: EaseScorer | None = None
        self.alpha = 1.0
        # The served fusion: weights per part (the transformer alone by default).
        self.weights: dict[str, float] = {"gen": 1.0}
        self.parts: dict[str, CatalogScorer] = {}
        section = config.get("hybrid")
        if hybrid and section is not None:
            if not isinstance(section, dict):
                raise ArtifactError(f"{folder} has a malformed hybrid section")
            if "fusion" in section:
                self.weights, self.parts = _load_fusion(verified, section, self.n_items, popularity)
                cf = self.parts.get("ease")
                self.cf = cf if isinstance(cf, EaseScorer) else None
            else:
                self.cf, self.alpha = _load_cf(verified, section, self.n_items)
                self.weights = {"ease": 1.0 - self.alpha, "gen": self.alpha}
                self.parts = {"ease": self.cf}
        self.name = "+".join(n for n in FUSED if self.weights.get(n, 0.0) > 0.0)
        self.retrieval = RetrievalConfig()
        self._retrieved: RetrievalBlend | None = None
        section = config.get("retrieval")
        if retrieval and section is not None:
            chosen = RetrievalConfig.from_json(section)
            if chosen.active:
                try:
                    text = TextRetrieval(_item_index(verified), self.item_ids)
                except (ArtifactError, InferenceError) as exc:
                    raise ArtifactError(f"{folder}: {exc} for retrieval") from exc
                self.retrieval = chosen
                self._retrieved = RetrievalBlend(_Mixed(self), text, chosen)
        self.trending = _trending_config(config, folder)
        # What the blend adds, per item (inference.trending.recent_feature), from use_recent.
        self._recent: np.ndarray | None = None
        self._recent_counts: np.ndarray | None = None  # the counts themselves
        self._blended_bases: dict[bytes, np.ndarray] = {}  # the last blend's model scores
        self.post: CatalogPost | None = None
        if post is not None and post.active:
            self.post = CatalogPost(self.item_ids, self._item_vectors(verified), post)
            self.name += "+post"

    def _item_vectors(self, verified: VerifiedArtifact) -> np.ndarray:
        """The item text embeddings of the artifact's FAISS index, in catalog order."""
        folder = verified.folder
        try:
            index = _item_index(verified)
        except ArtifactError as exc:
            raise ArtifactError(f"{exc} for post-processing") from exc
        if set(index.item_ids) != set(self.item_ids):
            raise ArtifactError(f"{folder}: the item index does not cover the vocabulary")
        return index.vectors(self.item_ids)

    def to_indices(self, history: list[str]) -> np.ndarray:
        """Catalog indices of a history; unknown ids are skipped (they cannot be scored)."""
        return np.asarray([self.index[i] for i in history if i in self.index], dtype=np.int64)

    @property
    def recent_days(self) -> int:
        """The window of recent popularity the model blends, in days (0: it blends none)."""
        return self.trending.days if self.trending.active else 0

    def use_recent(self, counts: Mapping[str, float] | None) -> None:
        """Recent popularity from now on: interactions per item id in the artifact's window
        (``None``: none known, the blend is off); ignored when the artifact has no blend."""
        if not self.trending.active:
            return
        if counts is None:
            self._recent = self._recent_counts = None
            return
        self._recent_counts = recent_counts(counts, self.index, self.n_items)
        logs = np.log1p(self._recent_counts)[None, :]
        self._recent = recent_feature(logs, self.trending.scale).astype(np.float32)

    @property
    def refreshes(self) -> bool:
        """Whether returning users' lists are made again to get recent popularity
        (``TrendingConfig.refreshes``): then :meth:`recommend` takes ``returning``."""
        return self.trending.refreshes

    def score(
        self, histories: Sequence[np.ndarray], returning: Sequence[bool] | None = None
    ) -> np.ndarray:
        """Catalog scores of non-empty index histories: the hybrid's mix, or the transformer's,
        with recent popularity or retrieval blended in for the short ones when the artifact
        carries them. A history short enough for recent popularity (once counts were given) gets
        the blend the lab measured (``inference.trending.blend_recent``), in place of retrieval's,
        in every list or, for an artifact whose blend is for returning users, in the lists made
        again for them (``returning``, per history); retrieval serves the short histories left."""
        recent = self._recent
        again = returning if returning is not None else [False] * len(histories)
        trend = [
            r
            for r, (h, back) in enumerate(zip(histories, again, strict=True))
            if self.trending.applies(len(h), back)
        ]
        if recent is None or not trend:
            return self._unblended(histories)
        out = np.empty((len(histories), self.n_items), dtype=np.float32)
        rest = sorted(set(range(len(histories))) - set(trend))
        if rest:
            out[rest] = self._unblended([histories[r] for r in rest])
        base = self.model_score([histories[r] for r in trend])
        # Kept for popular(), which scores these short histories without the counts next.
        self._blended_bases = {_key(histories[r]): base[i] for i, r in enumerate(trend)}
        out[trend] = blend_recent(base, recent, self.trending.weight)
        return out

    def _unblended(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """The scores without recent popularity: retrieval's blend where the artifact has it,
        else the model's."""
        scorer = self._retrieved if self._retrieved is not None else _Mixed(self)
        return scorer.score(histories)

    def model_score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """The model's catalog scores without retrieval: the fusion's, or the transformer's."""
        if (
            len(histories) == 1
            and (kept := self._blended_bases.get(_key(histories[0]))) is not None
        ):
            return kept[None, :].copy()  # a function of the history alone, scored just before
        if self.weights == {"gen": 1.0}:
            return self.scorer.score(histories)
        parts = {
            n: (self.scorer if n == "gen" else self.parts[n]).score(histories)
            for n, w in self.weights.items()
            if w > 0.0
        }
        return fuse(parts, self.weights)

    def recommend(
        self, histories: list[list[str]], k: int, returning: Sequence[bool] | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top ``k`` catalog items per history (oldest→newest ids), seen items excluded;
        ``returning`` says which lists are made again for a user who has been away (:meth:`score`).

        A history with no known item gets the training popularity ranking.
        """
        known = [self.to_indices(h) for h in histories]
        out: list[list[tuple[str, float]]] = [[] for _ in histories]
        rows = [r for r, h in enumerate(known) if len(h)]
        scores = np.tile(self._popularity, (len(histories), 1))
        if rows:
            again = None if returning is None else [bool(returning[r]) for r in rows]
            scores[rows] = self.score([known[r] for r in rows], again)
        picked: list[tuple[Sequence[int], Sequence[float]]]
        if self.post is None:
            top, vals = top_k_unseen(scores, known, k)
            picked = [(top[r].tolist(), vals[r].tolist()) for r in range(len(histories))]
        else:
            picked = [self.post.top(scores[r], known[r], k) for r in range(len(histories))]
        for r, (top_r, vals_r) in enumerate(picked):
            for i, v in zip(top_r, vals_r, strict=True):
                if not np.isfinite(v):
                    break  # fewer unseen items than k
                # By construction an index is a catalog position; checked because serving
                # anything else would be a silent corruption.
                if not 0 <= i < self.n_items:
                    raise ArtifactError(f"model produced index {i} outside the catalog")
                out[r].append((self.item_ids[i], float(v)))
        return out

    def explain(self, history: list[str], items: Sequence[str]) -> dict[str, list[str]]:
        """Each item's reasons: up to three history item ids, the largest contributors first
        (``inference.reasons.weight_reasons``; none without a collaborative part)."""
        known = self.to_indices(history)
        listed = [i for i in items if i in self.index]
        out: dict[str, list[str]] = {i: [] for i in items}
        if not len(known) or not listed:
            return out
        targets = np.asarray([self.index[i] for i in listed], dtype=np.int64)
        for item, reasons in zip(listed, weight_reasons(self, known, targets), strict=True):
            out[item] = [self.item_ids[r] for r in reasons]
        return out

    def recent_users(self, items: Iterable[str]) -> dict[str, int]:
        """How many users took each item up in the window, for the items at least
        :data:`~schemas.messages.POPULAR_MIN_USERS` did (none while no counts were given)."""
        counts = self._recent_counts
        if counts is None:
            return {}
        positions = {item: self.index.get(item) for item in items}
        return {
            item: int(counts[pos])
            for item, pos in positions.items()
            if pos is not None and counts[pos] >= POPULAR_MIN_USERS
        }

    def popular(
        self, history: list[str], items: Sequence[str], returning: bool = False
    ) -> dict[str, int]:
        """The items of a served list (``items``, best first) that recent popularity brought
        into it, with the users who took each up in the window: for a history the blend applies
        to, the listed items that the artifact without the counts (the scores it served before
        they came: the model's, or retrieval's blend) would not have placed among as many unseen
        items, of those :meth:`recent_users` names. Empty for any other history, and while no
        counts were given. ``returning``: the list was made again for a user who has been away."""
        known = self.to_indices(history)
        users = self.recent_users(items)
        if not users or not self.trending.applies(len(known), returning):
            return {}
        top, _ = top_k_unseen(self._unblended([known]), [known], len(items))
        listed_before = {self.item_ids[i] for i in top[0].tolist()}
        return {item: n for item, n in users.items() if item not in listed_before}


def _key(history: np.ndarray) -> bytes:
    """A history's catalog indices as bytes of one width, whatever array holds them."""
    return np.asarray(history, dtype=np.int64).tobytes()


def _trending_config(config: dict[str, Any], folder: Path) -> TrendingConfig:
    """The served recent-popularity blend of a config (off without its section)."""
    section = config.get("trending")
    if section is None:
        return TrendingConfig()
    try:
        return TrendingConfig.from_json(section)
    except ArtifactError as exc:
        raise ArtifactError(f"{folder}: {exc}") from exc


class _Mixed:
    """An artifact's model scores (without retrieval) as a catalog scorer."""

    def __init__(self, rec: ArtifactRecommender) -> None:
        self.rec, self.name, self.n_items = rec, rec.name, rec.n_items

    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return self.rec.model_score(histories)


def load_recommender(
    folder: str | Path,
    device: str | None = None,
    quantize: bool = True,
    hybrid: bool = True,
    post: PostConfig | None = None,
    *,
    retrieval: bool = True,
    trust: ArtifactTrust | None = None,
) -> ArtifactRecommender:
    """Verify and load an artifact written by ``recstream train``.

    ``hybrid=False`` serves the transformer alone even when the artifact carries the hybrid;
    ``retrieval=False`` leaves out the cold-start retrieval of its ``"retrieval"`` section.
    ``post`` (when it sets a step) runs the cosine floor and MMR on the model's candidates with
    the artifact's item index; an artifact without the index is then refused. ``trust`` (the
    verify keys, whether unsigned is allowed) defaults to the environment's
    (``RECSTREAM_ARTIFACT_VERIFY_KEY``...).
    """
    path = Path(folder)
    if not path.is_dir():
        raise ArtifactError(f"artifact folder {path} does not exist")
    return ArtifactRecommender(
        path,
        device=device,
        quantize=quantize,
        hybrid=hybrid,
        post=post,
        retrieval=retrieval,
        trust=trust,
    )
