"""The generative recommender: a small Llama-style causal transformer over item tokens.

Each item is one token (``index + 1``; token 0 pads). The model reads a history oldest→newest and
predicts the next item at every position; training uses the full softmax over the catalog
(SASRec-CE style), so every item competes with every other item, not with one sampled negative.
The output layer is tied to the item embeddings and scores the whole catalog in one pass, so the
model can only ever answer with a catalog item.

Built on transformers' ``LlamaModel`` so every projection is an ``nn.Linear`` and CPU inference
can use INT8 dynamic quantization. Item embeddings can start from the items' text embeddings
(projected to the hidden size), which also gives a new, text-only item a sensible place.

This module holds what loading and scoring need; training lives in ``lab.training``.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

__all__ = ["GenConfig", "GenScorer", "ItemTransformer", "quantize_int8"]


@dataclass
class GenConfig:
    """Architecture and training hyper-parameters of the item transformer."""

    n_items: int = 0
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn: int = 256
    dropout: float = 0.3
    attn_dropout: float = 0.2
    max_len: int = 200
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 128
    epochs: int = 200
    patience: int = 8
    seed: int = 0
    eval_every: int = 1
    # "cosine": learning rate decays to 0 over ``epochs`` (after one warm-up epoch), which
    # settles the noisy late epochs; "constant" keeps ``lr`` throughout.
    lr_schedule: str = "constant"
    # Each position is trained to predict the next ``future`` items, the k-th weighted
    # ``future_decay ** (k - 1)``: rating logs order items inside a session loosely, so the
    # exact next item is a noisy target and the near future a steadier one. 1 = next item only.
    future: int = 1
    future_decay: float = 0.5
    # Exponential moving average of the weights (decay per step; 0 = off). Validation, early
    # stopping and the saved model use the average, which is smoother than the last step's weights.
    ema: float = 0.0
    # Start item embeddings from the items' MiniLM text embeddings (train_gen then needs them).
    text_init: bool = False
    # How text vectors map to the hidden size: "random" projection or "pca" (top components).
    text_projection: str = "random"
    # Knowledge distillation (``lab.training.Distillation``): the weight of a teacher's
    # next-item distribution in the loss (0 = off), its softmax temperature, and how many folds
    # of users the teacher is fitted out of. Training only; serving ignores them.
    distill: float = 0.0
    distill_temperature: float = 0.2
    distill_folds: int = 5
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GenConfig:
        return cls(**data)


class ItemTransformer(nn.Module):
    """``LlamaModel`` backbone, dropout on input and output, output tied to the item embeddings."""

    def __init__(self, cfg: GenConfig) -> None:
        super().__init__()
        self.cfg = cfg
        llama = LlamaConfig(
            vocab_size=cfg.n_items + 1,
            hidden_size=cfg.hidden,
            intermediate_size=cfg.ffn,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads,
            max_position_embeddings=cfg.max_len + 1,
            attention_dropout=cfg.attn_dropout,
            rms_norm_eps=1e-6,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
            tie_word_embeddings=True,
        )
        self.backbone = LlamaModel(llama)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden, cfg.n_items + 1, bias=False)
        self.head.weight = self.backbone.embed_tokens.weight
        with torch.no_grad():
            self.backbone.embed_tokens.weight.normal_(0.0, 1.0 / math.sqrt(cfg.hidden))

    def init_from_text(self, text: np.ndarray, seed: int) -> None:
        """Start item embeddings as a projection of text embeddings ``(n_items, d)``.

        ``"random"``: a fixed random projection of the raw vectors; ``"pca"``: the centred
        vectors' scores on their top principal directions, which keep more of what tells the
        items apart in the few dimensions available. Either is scaled to the init's spread.
        """
        vecs = torch.from_numpy(np.asarray(text, dtype=np.float32))
        proj: torch.Tensor
        if self.cfg.text_projection == "pca":
            vecs = vecs - vecs.mean(0)
            _, _, vh = torch.linalg.svd(vecs, full_matrices=False)
            proj = vh[: self.cfg.hidden].T
        elif self.cfg.text_projection == "random":
            gen = torch.Generator().manual_seed(seed)
            proj = torch.randn(vecs.shape[1], self.cfg.hidden, generator=gen)
        else:
            raise ValueError(f"unknown text_projection {self.cfg.text_projection!r}")
        proj = proj / ((vecs @ proj).std() * math.sqrt(self.cfg.hidden))
        with torch.no_grad():
            self.backbone.embed_tokens.weight[1:] = vecs @ proj

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T, hidden)`` for right-padded tokens; causal attention never sees the padding."""
        emb = self.drop(self.backbone.embed_tokens(tokens))
        out = self.backbone(inputs_embeds=emb, use_cache=False).last_hidden_state
        hidden: torch.Tensor = self.drop(out)
        return hidden

    def catalog_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every catalog item (the padding token's column is dropped)."""
        logits: torch.Tensor = self.head(hidden)
        return logits[..., 1:]


def quantize_int8(model: nn.Module) -> nn.Module:
    """INT8 dynamic quantization of every ``nn.Linear`` (CPU inference)."""
    quantized = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # torch marks eager-mode quantization deprecated in favour of torchao, which is not a
        # dependency; the API still works and is what this CPU path needs.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        out: nn.Module = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
            quantized, {nn.Linear}, dtype=torch.qint8
        )
    return out


def _pad_right(seqs: Sequence[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Last ``max_len`` items of each history as tokens (index + 1), right-padded; and lengths."""
    cut = [np.asarray(s[-max_len:], dtype=np.int64) + 1 for s in seqs]
    lengths = torch.tensor([max(len(c), 1) for c in cut])
    tokens = torch.zeros(len(cut), int(lengths.max()) if cut else 1, dtype=torch.long)
    for row, c in enumerate(cut):
        tokens[row, : len(c)] = torch.from_numpy(c)
    return tokens, lengths


class GenScorer:
    """A trained :class:`ItemTransformer` scoring the catalog for index histories."""

    name = "gen"

    def __init__(
        self,
        model: nn.Module,
        cfg: GenConfig,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        precision: str = "fp32",
    ) -> None:
        self.model = model.eval()
        self.precision = precision
        self.cfg = cfg
        self.n_items = cfg.n_items
        self.device = device
        self.dtype = dtype

    @torch.inference_mode()
    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        if self.precision == "int8" and len(histories) > 1:
            # Dynamic INT8 quantizes activations with one scale per tensor, so in a batch a
            # user's list would depend on its neighbours and their padding. Alone it does not,
            # at a small cost (16 histories of 5-200 items, ml-100k artifact, one thread:
            # 27 ms one by one, 23 ms as one padded batch; best of 15).
            return np.concatenate([self.score([h]) for h in histories])
        tokens, lengths = _pad_right(histories, self.cfg.max_len)
        tokens = tokens.to(self.device)
        with torch.autocast(
            device_type="cuda" if self.device.startswith("cuda") else "cpu",
            dtype=self.dtype or torch.bfloat16,
            enabled=self.dtype is not None,
        ):
            hidden = self.model.hidden_states(tokens)  # type: ignore[operator]
            last = hidden[torch.arange(len(lengths)), lengths.to(self.device) - 1]
            logits = self.model.catalog_logits(last)  # type: ignore[operator]
        scores: np.ndarray = logits.float().cpu().numpy()
        assert scores.shape[1] == self.n_items, "the output layer must span exactly the catalog"
        return scores
