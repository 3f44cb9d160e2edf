"""Classification metrics, calibration error and temperature scaling.

Metrics come from scikit-learn; expected calibration error and temperature scaling (Guo et al.,
2017) are a few lines each and have no well-kept library, so they live here.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Per-bin mean confidence, accuracy and count (for the reliability diagram)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    out = {"confidence": [], "accuracy": [], "count": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            out["confidence"].append(float(conf[in_bin].mean()))
            out["accuracy"].append(float(correct[in_bin].mean()))
            out["count"].append(int(in_bin.sum()))
    return out


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 200) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) on held-out data.

    With no error on the held-out data the NLL has no finite minimum (it keeps falling as T -> 0),
    and fitting would only make the model over-confident on anything new: then T is kept at 1.
    """
    if (np.asarray(logits).argmax(axis=1) == np.asarray(labels)).all():
        return 1.0
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.exp().item())
    return t if math.isfinite(t) and 0.01 < t < 100 else 1.0


def classification_metrics(logits: np.ndarray, labels: np.ndarray, label_names: list[str],
                           temperature: float = 1.0, n_bins: int = 15) -> dict:
    """Accuracy, macro P/R/F1, per-class report, ROC-AUC, PR-AUC, confusion matrix, ECE and NLL."""
    labels = np.asarray(labels)
    k = len(label_names)
    probs = softmax(logits, temperature)
    raw_probs = softmax(logits, 1.0)
    preds = probs.argmax(axis=1)
    p, r, f, s = precision_recall_fscore_support(labels, preds, labels=list(range(k)), zero_division=0)
    macro = precision_recall_fscore_support(labels, preds, labels=list(range(k)), average="macro", zero_division=0)
    present = np.unique(labels)
    roc_auc = pr_auc = None
    if len(present) == k and k == 2:
        roc_auc = float(roc_auc_score(labels, probs[:, 1]))
        pr_auc = float(average_precision_score(labels, probs[:, 1]))
    elif len(present) == k:
        roc_auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(k))))
    nll = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
    return {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, preds)),
        "precision_macro": float(macro[0]),
        "recall_macro": float(macro[1]),
        "f1_macro": float(macro[2]),
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "ece": expected_calibration_error(probs, labels, n_bins),
        "ece_uncalibrated": expected_calibration_error(raw_probs, labels, n_bins),
        "nll": nll,
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(label_names)
        },
        "confusion_matrix": confusion_matrix(labels, preds, labels=list(range(k))).tolist(),
    }
