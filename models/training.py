"""One training loop for every head: AdamW, warmup + cosine/polynomial schedule, early stopping on validation."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .device import resolve_device
from .features import MaskedSplit, Split, batch_rows
from .heads.base import FeatureBatch, Head
from .metrics import classification_metrics, primary_metric


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch; ``deterministic`` also asks for deterministic kernels (cuBLAS also needs
    ``CUBLAS_WORKSPACE_CONFIG`` before its first call: the run layer sets it, ``runs.train``)."""
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    # results do not depend on it, and NaN-filling every new tensor cost 11% of an MMP epoch on CPU
    torch.utils.deterministic.fill_uninitialized_memory = False


def batches(data: Split, size: int, generator: torch.Generator | None = None) -> Iterator[FeatureBatch]:
    """Shuffled batches with a ``generator``; in order without one (``batch_rows``: a FeatureBatch's are views of
    it, a MaskedSplit's are built from its rows, its pattern applied to the batch alone)."""
    order = None if generator is None else torch.randperm(data.size, generator=generator)
    for start in range(0, data.size, size):
        yield batch_rows(data, slice(start, start + size) if order is None else order[start : start + size])


def task_loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits.float(), y.float())
    return F.cross_entropy(logits.float(), y)


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warm = max(1, int(cfg.warmup_frac * total_steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else (1 - t) ** cfg.poly_power
    return f


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and bf16)


def stage(data: Split, device: torch.device, budget: float = 0.25, moved: dict | None = None) -> Split:
    """The whole split on the GPU when it fits in ``budget`` of free memory (batches are then sliced there
    instead of copied over each step); unchanged otherwise and on CPU. ``moved`` (id of a FeatureBatch -> its
    copy on the device, or None when it did not fit) lets masked splits of one split share one copy."""
    if device.type != "cuda":
        return data
    base, moved = (data.data if isinstance(data, MaskedSplit) else data), {} if moved is None else moved
    if id(base) not in moved:
        need = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in base.tensors().values())
        moved[id(base)] = base.to(device) if need < budget * torch.cuda.mem_get_info(device)[0] else None
    if moved[id(base)] is None:
        return data
    return data.on(moved[id(base)]) if isinstance(data, MaskedSplit) else moved[id(base)]


@torch.no_grad()
def predict(head: Head, data: Split, cfg: TrainConfig) -> torch.Tensor:
    """Logits for every row of ``data`` (float32, CPU), in order."""
    device = resolve_device(cfg.device, "train.device")
    head.to(device).eval()
    outs = []
    for b in batches(data, cfg.eval_batch_size):
        with _autocast(device, cfg.bf16):
            outs.append(head(b.to(device)).logits.float().cpu())
    return torch.cat(outs)


@dataclass
class FitResult:
    best_epoch: int
    best_score: float
    seconds: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # each epoch's wall time, its validation included


def fit(head: Head, train: Split, val: Split | dict[str, Split], cfg: TrainConfig, seed: int,
        on_epoch: Callable[[dict], None] | None = None) -> FitResult:
    """Train ``head`` in place; keep the weights of the epoch with the best validation score: the primary
    metric averaged over the validation scenarios in ``val`` (validation split only; masked splits of one split
    are evaluated batch by batch from its one copy)."""
    seed_everything(seed, cfg.deterministic)
    device = resolve_device(cfg.device, "train.device")
    moved: dict = {}
    train = stage(train, device, moved=moved)
    vals = {k: stage(v, device, moved=moved) for k, v in (val if isinstance(val, dict) else {"val": val}).items()}
    head.to(device)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(train.size / cfg.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, cfg.epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    task, key = head.spec.task, primary_metric(head.spec.task)
    best, best_state, best_epoch, bad, history, epoch_seconds = -math.inf, None, -1, 0, [], []
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        t_epoch = time.perf_counter()
        head.train()
        total = aux_total = 0.0
        stats: dict[str, float] = {}
        for b in batches(train, cfg.batch_size, gen):
            b = b.to(device)
            with _autocast(device, cfg.bf16):
                out = head(b)
                y = b.y if out.target_index is None else b.y[out.target_index]
                loss = task_loss(out.logits, y, task)
                full = loss + out.aux_loss
            opt.zero_grad(set_to_none=True)
            full.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            total += loss.item() * b.size
            aux_total += float(out.aux_loss.detach()) * b.size
            for name, value in out.stats.items():
                stats[name] = stats.get(name, 0.0) + float(value) * b.size
        scores = {name: classification_metrics(predict(head, v, cfg), v.y, task)[key] for name, v in vals.items()}
        score = sum(scores.values()) / len(scores)
        row = {"epoch": epoch, "train_loss": total / train.size, "aux_loss": aux_total / train.size,
               **{name: value / train.size for name, value in stats.items()}, f"val_{key}": score, **({f"val_{key}/{n}": v for n, v in scores.items()} if len(scores) > 1 else {})}
        history.append(row)
        epoch_seconds.append(time.perf_counter() - t_epoch)
        if on_epoch:
            on_epoch({**row, "seconds": epoch_seconds[-1]})  # logged as train/seconds (the history stays timeless)
        if score > best:
            best, best_epoch, bad = score, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in head.state_dict().items()})
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    return FitResult(best_epoch, best, time.perf_counter() - t0, len(history), history, epoch_seconds)
