"""Classification metrics: accuracy, macro-F1, per-class, multi-label F1, AUROC, ECE, robustness AUC."""
from __future__ import annotations

import numpy as np
import torch


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def expected_calibration_error(prob: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf, pred = prob.max(1), prob.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs((pred[sel] == y[sel]).mean() - conf[sel].mean())
    return float(ece)


def auroc(score: np.ndarray, y: np.ndarray) -> float:
    """Rank-based (Mann-Whitney) AUROC for binary labels; ties get average ranks."""
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return float("nan")
    order = score.argsort()
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    for v in np.unique(score):  # average ranks over ties
        tie = score == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * neg.sum()))


def classification_metrics(logits: torch.Tensor, y: torch.Tensor, task: str = "multiclass") -> dict:
    """Scalar metrics plus per-class lists (``per_class_f1``, ``per_class_acc``)."""
    logits, y = logits.float().cpu(), y.cpu()
    if task == "multilabel":
        pred = (logits > 0).numpy().astype(int)
        yt = y.numpy().astype(int)
        tp, fp, fn = (pred & yt).sum(0), (pred & ~yt.astype(bool)).sum(0), (~pred.astype(bool) & yt).sum(0)
        per = _f1(tp, fp, fn)
        return {"f1_macro": float(per.mean()), "f1_micro": float(_f1(tp.sum(), fp.sum(), fn.sum())),
                "per_class_f1": per.tolist()}
    prob = torch.softmax(logits, -1).numpy()
    yt, pred = y.numpy(), prob.argmax(1)
    C = prob.shape[1]
    conf = np.zeros((C, C), dtype=np.int64)
    np.add.at(conf, (yt, pred), 1)
    tp = np.diag(conf)
    per_f1 = _f1(tp, conf.sum(0) - tp, conf.sum(1) - tp)
    support = conf.sum(1)
    out = {"acc": float((pred == yt).mean()), "f1_macro": float(per_f1[support > 0].mean()),
           "ece": expected_calibration_error(prob, yt), "per_class_f1": per_f1.tolist(),
           "per_class_acc": np.where(support > 0, tp / np.maximum(support, 1), np.nan).tolist(),
           "confusion": conf.tolist()}
    if task == "binary":
        out["auroc"] = auroc(prob[:, 1], yt)
    return out


def primary_metric(task: str) -> str:
    return {"multiclass": "acc", "binary": "auroc", "multilabel": "f1_macro"}[task]


def robustness_auc(rates: list[float], scores: list[float]) -> float:
    """Area under score-vs-missing-rate, normalised by the rate range (1.0 = perfect at every rate)."""
    r, s = np.asarray(rates, float), np.asarray(scores, float)
    order = r.argsort()
    r, s = r[order], s[order]
    return float(np.sum((s[1:] + s[:-1]) / 2 * np.diff(r)) / (r[-1] - r[0])) if len(r) > 1 else float(s[0])
