"""`driftloop cv`: stratified k-fold cross-validation, mean ± std per metric.

Each fold trains on the other k-1 folds (with its own stratified validation split for early
stopping and temperature), and is scored on the held-out fold. Nothing is registered.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from core.errors import DriftloopError
from finetune.config import TrainConfig
from finetune.data import PreparedData, Split
from finetune.pipeline import evaluate, load_data
from finetune.training import fit

CV_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "roc_auc", "ece")


def cross_validate(config: TrainConfig, folds: int = 5, quiet: bool = False) -> dict:
    data = load_data(config)
    texts = data.train.texts + data.val.texts
    labels = np.asarray(data.train.labels + data.val.labels)
    smallest = np.bincount(labels).min()
    if folds < 2 or folds > smallest:
        raise DriftloopError(f"--folds must be between 2 and the smallest class size ({smallest}); got {folds}")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=config.training.seed)
    per_fold = []
    for i, (train_idx, test_idx) in enumerate(splitter.split(texts, labels), start=1):
        started = time.perf_counter()
        tr_idx, val_idx = train_test_split(train_idx, test_size=config.data.val_fraction, stratify=labels[train_idx],
                                           random_state=config.training.seed)
        pick = lambda idx: Split([texts[j] for j in idx], labels[idx].tolist())  # noqa: E731
        fold = PreparedData(pick(tr_idx), pick(val_idx), pick(test_idx), data.label_names, data.cleaning)
        fitted = fit(config, fold, quiet=True, progress=False)
        metrics = evaluate(config, fitted, fold).metrics["test"]
        per_fold.append({k: metrics[k] for k in CV_METRICS} | {"n": metrics["n"], "seconds": round(time.perf_counter() - started, 2)})
        if not quiet:
            print(f"fold {i}/{folds}  accuracy {metrics['accuracy']:.4f}  f1_macro {metrics['f1_macro']:.4f}  "
                  f"({per_fold[-1]['seconds']:.1f}s)", file=sys.stderr, flush=True)
    summary = {}
    for key in CV_METRICS:
        values = [f[key] for f in per_fold if f[key] is not None]
        if values:
            summary[key] = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return {"folds": folds, "rows": len(texts), "label_names": data.label_names, "metrics": summary, "per_fold": per_fold,
            "data": data.fingerprint()}
