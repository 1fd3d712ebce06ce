"""Training the generative transformer (``inference.generative.ItemTransformer``).

Full-softmax cross-entropy over the catalog on windows of the training histories, optionally
against the near future (next ``K`` items), against a teacher's next-item distribution as well
(:class:`Distillation`) and with an exponential moving average of the weights; early stopping on
validation NDCG@10. Serving never imports this: it loads what
``lab.artifact.save_artifact`` wrote.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from inference.generative import GenConfig, GenScorer, ItemTransformer
from inference.scoring import CatalogScorer
from lab.baselines import Ranker
from lab.protocol import Split, stage_ndcg_per_user

__all__ = [
    "Distillation",
    "GenRanker",
    "default_teacher",
    "distillation",
    "distilled_targets",
    "ease_teacher",
    "evaluate_ndcg",
    "future_loss",
    "sampled_loss",
    "teacher_targets",
    "train_gen",
    "training_windows",
]


class GenRanker(GenScorer, Ranker):
    """The served transformer scorer as a lab ranker (it is trained by :func:`train_gen`)."""

    def fit(self, split: Split) -> GenRanker:
        return self


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


@dataclass(frozen=True)
class Distillation:
    """A teacher's next-item distribution as a second training target (knowledge distillation).

    At every training position the teacher scores the catalog from the items up to it (the last
    ``context`` of them), the items already there are excluded, and its ``top_k`` items get
    ``softmax(score / temperature)``. The transformer's loss becomes ``(1 - weight) * CE(next
    item) + weight * CE(teacher distribution)``: the teacher's view of what else could come next
    is a denser target than the one item that did.

    The teacher is fitted out of fold: ``fit`` is called ``folds`` times, each on the split
    without the users ``u % folds == f``, and that teacher scores only those users. A teacher
    fitted on a user's own history has memorised what came next there and would hand the target
    back instead of its judgement.
    """

    fit: Callable[[Split], CatalogScorer]
    weight: float = 0.5
    temperature: float = 0.2
    folds: int = 5
    top_k: int = 64
    context: int = 50


def teacher_targets(
    split: Split, max_len: int, distill: Distillation, *, progress: bool = True
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per training window (in :func:`training_windows` order), ``(items, probs)`` of shape
    ``(len(window) - 1, top_k)``: the out-of-fold teacher's distribution after each position."""
    folds, seqs = distill.folds, split.train
    taught: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    empty = np.zeros(0, dtype=np.int64)
    bar = tqdm(total=sum(max(len(s) - 1, 0) for s in seqs), desc="teacher", disable=not progress)
    for f in range(folds):
        # Fitted, used and dropped one fold at a time: a teacher can be a dense items x items.
        teacher = distill.fit(
            replace(split, train=[empty if u % folds == f else s for u, s in enumerate(seqs)])
        )
        for u in range(f, len(seqs), folds):
            taught[u] = [_teach(teacher, w, distill) for w in training_windows([seqs[u]], max_len)]
            bar.update(max(len(seqs[u]) - 1, 0))
    bar.close()
    return [pair for u in range(len(seqs)) for pair in taught[u]]


def _teach(
    teacher: CatalogScorer, window: np.ndarray, distill: Distillation
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's ``top_k`` items after each position of ``window`` (none of the items up to
    it) and their softmax at the distillation's temperature."""
    ends = range(1, len(window))
    scores = teacher.score([window[max(0, end - distill.context) : end] for end in ends])
    for row, end in enumerate(ends):
        scores[row, window[:end]] = -1e30  # finite: a tiny catalog may have nothing else
    k = min(distill.top_k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    s = np.take_along_axis(scores, top, axis=1) / distill.temperature
    s -= s.max(axis=1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=1, keepdims=True)
    return top, p.astype(np.float32)


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


def sampled_loss(
    model: ItemTransformer,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    negatives: int,
    loss_fn: nn.Module,
) -> torch.Tensor:
    """Cross-entropy over the batch's targets and ``negatives`` uniformly drawn items.

    ``targets`` is ``(B, T)`` with -100 at padding. Uniform negatives need no sampling
    correction; the batch's targets, which are also negatives for the other positions, follow
    popularity, as in-batch negatives do.
    """
    valid = targets >= 0
    drawn = torch.randint(0, model.cfg.n_items, (negatives,))
    candidates = torch.unique(torch.cat([targets[valid], drawn]))
    position = torch.full((model.cfg.n_items,), -100, dtype=torch.long)
    position[candidates] = torch.arange(len(candidates))
    mapped = torch.where(valid, position[targets.clamp(min=0)], torch.full_like(targets, -100))
    weight = model.head.weight[candidates + 1]  # token 0 is padding
    logits = hidden @ weight.T
    loss: torch.Tensor = loss_fn(logits.reshape(-1, len(candidates)), mapped.reshape(-1))
    return loss


def ease_teacher(params: dict[str, float]) -> Callable[[Split], CatalogScorer]:
    """Fits EASE with ``params`` (e.g. the settings tuned on validation): the default teacher."""
    from lab.baselines import EASE

    def fit(part: Split) -> CatalogScorer:
        return EASE(
            lam=params["lam"],
            decay=params["decay"],
            beta=params["beta"],
            markov_last=int(params["markov_last"]),
            max_items=int(params.get("max_items", part.n_items)),
        ).fit(part)

    return fit


def default_teacher(split: Split, *, progress: bool = False) -> Callable[[Split], CatalogScorer]:
    """EASE with the settings tuned on ``split``'s validation, as :func:`ease_teacher`."""
    from lab.baselines import EASE
    from lab.evaluate import baseline

    tuned = baseline("ease", split, say=lambda _: None, progress=progress)
    assert isinstance(tuned, EASE)
    return ease_teacher(tuned.params())


def distillation(cfg: GenConfig, fit: Callable[[Split], CatalogScorer]) -> Distillation:
    """The distillation ``cfg`` asks for (weight, temperature, folds), taught by ``fit``."""
    return Distillation(
        fit, weight=cfg.distill, temperature=cfg.distill_temperature, folds=cfg.distill_folds
    )


def _distillable(cfg: GenConfig, negatives: int, n_items: int) -> bool:
    """Whether ``cfg`` distils; refuses what distillation cannot train with (a sampled softmax,
    the near-future target)."""
    if cfg.distill <= 0:
        return False
    if 0 < negatives < n_items or cfg.future != 1:
        raise ValueError("distillation trains with the full softmax and the next-item target")
    return True


def distilled_targets(
    split: Split,
    cfg: GenConfig,
    negatives: int = 0,
    *,
    teacher: Callable[[Split], CatalogScorer] | None = None,
    progress: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """The teacher's targets :func:`train_gen` trains ``cfg`` with on ``split`` (``None`` when it
    does not distil), taught by ``teacher`` (default: EASE tuned on validation)."""
    if not _distillable(cfg, negatives, split.n_items):
        return None
    fit = teacher or default_teacher(split, progress=progress)
    return teacher_targets(split, cfg.max_len, distillation(cfg, fit), progress=progress)


def _distilled_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    taught: Sequence[tuple[np.ndarray, np.ndarray]],
    weight: float,
) -> torch.Tensor:
    """``(1 - weight) * CE(next item) + weight * CE(teacher)`` over the batch's positions."""
    logp = torch.log_softmax(logits, dim=-1)
    b, width = targets.shape
    k = taught[0][0].shape[1]  # top_k, or the whole catalog when it is smaller
    items = torch.zeros(b, width, k, dtype=torch.long)
    probs = torch.zeros(b, width, k)
    for row, (i, p) in enumerate(taught):
        items[row, : len(i)] = torch.from_numpy(i)
        probs[row, : len(p)] = torch.from_numpy(p)
    valid = targets >= 0
    n = valid.sum().clamp(min=1)
    ce = nn.functional.nll_loss(logp.reshape(-1, logp.shape[-1]), targets.reshape(-1))
    kd = -(probs * logp.gather(-1, items)).sum() / n
    loss: torch.Tensor = (1 - weight) * ce + weight * kd
    return loss


def evaluate_ndcg(rec: GenScorer, split: Split, stage: str, batch: int = 256) -> float:
    return float(np.mean(stage_ndcg_per_user(rec, split, stage, batch=batch)))


def train_gen(
    split: Split,
    cfg: GenConfig,
    *,
    text_embeddings: np.ndarray | None = None,
    time_budget_s: float | None = None,
    negatives: int = 0,
    teacher: Callable[[Split], CatalogScorer] | None = None,
    taught: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    progress: bool = True,
    say: Callable[[str], None] = print,
) -> tuple[ItemTransformer, dict[str, Any]]:
    """Train on ``split.train`` with full-softmax CE; early-stop on validation NDCG@10.

    ``negatives`` > 0 (and below the catalog size) trains with a sampled softmax instead
    (:func:`sampled_loss`), which is what makes an epoch over a large catalog affordable on CPU;
    validation still ranks the whole catalog. The time budget is checked after every step.
    ``cfg.distill`` > 0 adds the teacher's distribution to the loss (:class:`Distillation`):
    ``taught`` are its targets already built for this split and ``cfg`` (:func:`distilled_targets`;
    a search reuses them across trials), else ``teacher`` fits it (default: EASE tuned on
    validation).
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
    # Sampled softmax: the batch's own targets plus ``negatives`` uniform items per step.
    sampled = 0 < negatives < split.n_items and cfg.future == 1
    # The time budget covers the teacher: its targets are part of this training's cost.
    started = time.monotonic()
    if not _distillable(cfg, negatives, split.n_items):
        taught = None
    elif taught is None:
        taught = distilled_targets(split, cfg, negatives, teacher=teacher, progress=progress)
    teacher_s = time.monotonic() - started
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
            hidden = model.hidden_states(inputs)
            if sampled:
                loss = sampled_loss(model, hidden, targets[0], negatives, loss_fn)
            elif taught is not None:
                loss = _distilled_loss(
                    model.catalog_logits(hidden),
                    targets[0],
                    [taught[i] for i in batch],
                    cfg.distill,
                )
            else:
                logits = model.catalog_logits(hidden)
                loss = future_loss(logits, targets, cfg.future_decay, loss_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if averaged is not None:
                averaged.update_parameters(model)
            total += loss.item() * len(seqs)
            count += len(seqs)
            if time_budget_s is not None and time.monotonic() - started > time_budget_s:
                break  # a large catalog's epoch can outlast the budget: stop inside it
        entry = {"epoch": float(epoch), "loss": total / max(count, 1)}
        if epoch % cfg.eval_every == 0:
            ndcg = evaluate_ndcg(GenScorer(judged, cfg), split, "valid")
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
        "sampled_negatives": negatives if sampled else 0,
        "teacher_seconds": round(teacher_s, 1),
        "history": history,
    }
    return model, log
