"""The generative recommender: a small Llama-style causal transformer over item tokens.

Each item is one token (``index + 1``; token 0 pads). The model reads a history oldest→newest and
predicts the next item at every position; training uses the full softmax over the catalog
(SASRec-CE style), so every item competes with every other item, not with one sampled negative.
The output layer is tied to the item embeddings and scores the whole catalog in one pass, so the
model can only ever answer with a catalog item.

Built on transformers' ``LlamaModel`` so every projection is an ``nn.Linear`` and CPU inference
can use INT8 dynamic quantization. Item embeddings can start from the items' text embeddings
(projected to the hidden size), which also gives a new, text-only item a sensible place.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import LlamaConfig, LlamaModel

from lab.baselines import Recommender
from lab.protocol import Split, metrics_from_ranks, target_ranks

__all__ = [
    "GenConfig",
    "GenRecommender",
    "ItemTransformer",
    "future_loss",
    "quantize_int8",
    "train_gen",
]


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


class GenRecommender(Recommender):
    """Wraps a trained :class:`ItemTransformer` in the recommender interface."""

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

    def fit(self, split: Split) -> GenRecommender:
        return self  # trained by train_gen

    @torch.inference_mode()
    def score(self, histories: Sequence[np.ndarray]) -> np.ndarray:
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


def training_windows(seqs: Sequence[np.ndarray], max_len: int) -> list[np.ndarray]:
    """Cut each sequence from its end into windows of ``max_len + 1`` items (shared boundary).

    Every transition of every training sequence is a target exactly once; long histories become
    several windows instead of being truncated.
    """
    out = []
    for seq in seqs:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_len - 1)
            out.append(np.asarray(seq[start:end], dtype=np.int64))
            end = start + 1
            if start == 0:
                break
    return out


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


def future_loss(
    logits: torch.Tensor, targets: torch.Tensor, decay: float, loss_fn: nn.Module
) -> torch.Tensor:
    """Cross-entropy against each of the ``K`` next items (``targets`` is ``(K, B, T)``)."""
    flat = logits.reshape(-1, logits.shape[-1])
    if targets.shape[0] == 1:
        loss: torch.Tensor = loss_fn(flat, targets[0].reshape(-1))
        return loss
    logp = torch.log_softmax(flat, dim=-1)
    total, norm = logp.new_zeros(()), 0.0
    for k in range(targets.shape[0]):
        t = targets[k].reshape(-1)
        if bool((t >= 0).any()):
            total = total + decay**k * nn.functional.nll_loss(logp, t, ignore_index=-100)
            norm += decay**k
    return total / max(norm, 1e-9)


def evaluate_ndcg(rec: GenRecommender, split: Split, stage: str, batch: int = 256) -> float:
    hist, targets = split.histories(stage), split.targets(stage)
    ranks = np.concatenate(
        [
            target_ranks(
                rec.score(hist[s : s + batch]), hist[s : s + batch], targets[s : s + batch]
            )
            for s in range(0, len(hist), batch)
        ]
    )
    return metrics_from_ranks(ranks)["ndcg@10"]


def train_gen(
    split: Split,
    cfg: GenConfig,
    *,
    text_embeddings: np.ndarray | None = None,
    time_budget_s: float | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> tuple[ItemTransformer, dict[str, Any]]:
    """Train on ``split.train`` with full-softmax CE; early-stop on validation NDCG@10.

    Returns the best model (by validation NDCG@10) and a training log.
    """
    _seed_all(cfg.seed)
    cfg.n_items = split.n_items
    model = ItemTransformer(cfg)
    if cfg.text_init:
        if text_embeddings is None:
            raise ValueError("text_init needs the items' text embeddings")
        model.init_from_text(text_embeddings, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}")
    windows = training_windows(split.train, cfg.max_len)
    # Sorting windows by length inside shuffled buckets keeps padding small on CPU.
    rng = np.random.default_rng(cfg.seed)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    averaged = (
        torch.optim.swa_utils.AveragedModel(
            model,
            multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),  # type: ignore[no-untyped-call]
        )
        if cfg.ema > 0
        else None
    )
    judged: ItemTransformer = averaged.module if averaged is not None else model  # type: ignore[assignment]
    best = (-1.0, 0, copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    started = time.monotonic()
    stale = 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="train gen", disable=not progress, unit="epoch")
    for epoch in bar:
        model.train()
        if cfg.lr_schedule == "cosine":
            warm = min(1.0, epoch / 2)
            decay = 0.5 * (1 + math.cos(math.pi * (epoch - 1) / max(cfg.epochs, 1)))
            for group in opt.param_groups:
                group["lr"] = cfg.lr * warm * decay
        order = rng.permutation(len(windows))
        buckets = [
            order[i : i + cfg.batch_size * 16] for i in range(0, len(order), cfg.batch_size * 16)
        ]
        batches: list[list[int]] = []
        for bucket in buckets:
            ordered = sorted(bucket.tolist(), key=lambda i: len(windows[i]))
            batches += [
                ordered[i : i + cfg.batch_size] for i in range(0, len(ordered), cfg.batch_size)
            ]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        total, count = 0.0, 0
        for batch in batches:
            seqs = [windows[i] for i in batch]
            width = max(len(s) for s in seqs) - 1
            inputs = torch.zeros(len(seqs), width, dtype=torch.long)
            targets = torch.full((cfg.future, len(seqs), width), -100, dtype=torch.long)
            for row, s in enumerate(seqs):
                inputs[row, : len(s) - 1] = torch.from_numpy(s[:-1] + 1)
                for k in range(min(cfg.future, len(s) - 1)):
                    targets[k, row, : len(s) - 1 - k] = torch.from_numpy(s[1 + k :])
            logits = model.catalog_logits(model.hidden_states(inputs))
            loss = future_loss(logits, targets, cfg.future_decay, loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if averaged is not None:
                averaged.update_parameters(model)
            total += loss.item() * len(seqs)
            count += len(seqs)
        entry = {"epoch": float(epoch), "loss": total / max(count, 1)}
        if epoch % cfg.eval_every == 0:
            ndcg = evaluate_ndcg(GenRecommender(judged, cfg), split, "valid")
            entry["valid_ndcg@10"] = ndcg
            if ndcg > best[0]:
                best = (ndcg, epoch, copy.deepcopy(judged.state_dict()))
                stale = 0
            else:
                stale += 1
            bar.set_postfix(loss=f"{entry['loss']:.3f}", ndcg=f"{ndcg:.4f}", best=f"{best[0]:.4f}")
        history.append(entry)
        if stale >= cfg.patience:
            say(f"early stop at epoch {epoch}: best valid ndcg@10 {best[0]:.4f} (epoch {best[1]})")
            break
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            say(f"time budget reached at epoch {epoch}: best valid ndcg@10 {best[0]:.4f}")
            break
    model.load_state_dict(best[2])
    model.eval()
    log = {
        "best_epoch": best[1],
        "valid_ndcg@10": best[0],
        "epochs_run": len(history),
        "train_seconds": time.monotonic() - started,
        "history": history,
    }
    return model, log
