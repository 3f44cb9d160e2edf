"""One monitor pass: a window of live predictions against the serving model's reference profile.

Decision rule (documented in README "Monitoring"): every drift test yields a p-value, computed with
Evidently 0.7's Report API (`ValueDrift`: chi-square on the predicted label, Kolmogorov-Smirnov on the
calibrated confidence, on the class probabilities and on each text descriptor) or by our embedding
permutation test (monitoring/stats.py says why). The window drifts when Holm-Bonferroni rejects at
least one test at the family-wise level `alpha` (default 0.01): one pass on unchanged traffic raises a
false alarm with probability ≤ alpha, however many tests there are. The policy (controller) then
asks drift to persist over K windows before acting.

Quality: realized accuracy (Wilson 95 % interval) and macro-F1 (bootstrap interval) on the rows that
received feedback, only from `min_labels` labels on; estimated accuracy without labels (CBPE-style:
with calibrated probabilities the expected accuracy is the mean confidence), and its error against
the realized accuracy on the labelled rows.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from evidently import DataDefinition, Dataset, Report
from evidently.metrics import ValueDrift

from core import registry, runtimes
from core.descriptors import DESCRIPTOR_COLUMNS
from core.profile import prob_column
from monitoring import stats
from monitoring.config import MonitorConfig
from monitoring.window import Window

log = logging.getLogger("driftloop.monitor")


@dataclass
class TestResult:
    name: str
    kind: str  # prediction | probability | descriptor | embedding
    method: str
    statistic: float  # the p-value for Evidently's tests; MMD² for the embedding test
    p_value: float
    threshold: float  # the Holm threshold this test's p-value was held against
    drift: bool
    n_reference: int
    n_current: int

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


@dataclass
class PassResult:
    model_version: str
    status: str  # ok | insufficient
    drift: bool | None
    window_size: int
    window_first_id: int | None
    window_last_id: int | None
    window_start: dt.datetime | None
    window_end: dt.datetime | None
    alpha: float
    tests: list[TestResult] = field(default_factory=list)
    quality: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    duration_s: float = 0.0
    snapshot: object | None = None  # Evidently snapshot (not serialised)

    def to_json(self) -> dict:
        iso = lambda t: t.isoformat() if t else None  # noqa: E731
        return {
            "model_version": self.model_version, "status": self.status, "drift": self.drift,
            "window_size": self.window_size, "window_first_id": self.window_first_id, "window_last_id": self.window_last_id,
            "window_start": iso(self.window_start), "window_end": iso(self.window_end), "alpha": self.alpha,
            "decision_rule": f"drift when Holm-Bonferroni rejects any test at family-wise alpha={self.alpha}",
            "tests": [t.to_json() for t in self.tests], "quality": clean(self.quality), "reference": clean(self.reference),
            "duration_s": round(self.duration_s, 3),
        }


def clean(obj):
    """JSON-safe: NaN and infinities become None."""
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


@dataclass
class Reference:
    """What a model version looks like on what it serves (core.profile; a refined model's profile
    is its own view of the traffic it was refined for) and how accurate it is (on its regression
    suite: every domain it was promoted for, held out; for a first model, its validation split)."""

    model_version: str
    label_names: list[str]
    frame: pd.DataFrame
    embeddings: np.ndarray
    accuracy: float | None
    accuracy_n: int = 0
    runtime: str = "torch"

    @classmethod
    def load(cls, model_version: str, runtime: str = "torch") -> "Reference":
        """The reference as `runtime` computes it (core/runtimes.reference_profile): live rows and
        reference are then measured by the same graph, so a runtime is never mistaken for drift."""
        model = registry.get(model_version)
        frame, embeddings, info = runtimes.reference_profile(model, runtime)
        accuracy, n = info["accuracy"], info["accuracy_n"]
        if accuracy is None:  # registered before references were recorded: its validation split
            val = (model.lineage.get("metrics") or {}).get("val") or {}
            accuracy, n = val.get("accuracy"), int(val.get("n") or len(frame))
        return cls(model_version, list(model.lineage["label_names"]), frame, embeddings, accuracy, n, runtime)


def probability_columns(label_names: list[str]) -> list[str]:
    """Class-probability columns to test; with two classes one carries all the information."""
    names = label_names[1:] if len(label_names) == 2 else label_names
    return [prob_column(n) for n in names]


def _drift_inputs(reference: Reference, window: Window, alpha: float):
    """(columns [(name, kind, method)], ValueDrift metrics, current dataset, reference dataset)."""
    columns = [("prediction", "prediction", "chisquare"), ("confidence", "probability", "ks")]
    columns += [(c, "probability", "ks") for c in probability_columns(reference.label_names)]
    columns += [(c, "descriptor", "ks") for c in DESCRIPTOR_COLUMNS]
    numeric = [c for c, _, m in columns if m == "ks"]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=["prediction"])
    names = [c for c, _, _ in columns]
    ref = Dataset.from_pandas(reference.frame[names].copy(), data_definition=definition)
    cur = Dataset.from_pandas(window.frame[names].copy(), data_definition=definition)
    return columns, [ValueDrift(column=c, method=m, threshold=alpha) for c, _, m in columns], cur, ref


def dashboard_snapshot(reference: Reference, window: Window, result: PassResult, generation: int | None):
    """The pass's snapshot for its HTML report and the Evidently workspace: the drift tests plus
    driftloop's own figures (monitoring/pass_values.py), tagged with the serving model. Run again
    after the tests (the figures need Holm's verdicts; ValueDrift is recomputed: ~0.2 s a pass on
    2 cores, only when reports are on)."""
    from monitoring import pass_values  # noqa: PLC0415 - registers PassValue with Evidently

    _, metrics, cur, ref = _drift_inputs(reference, window, result.alpha)
    figures = pass_values.values(result.quality, result.tests, result.alpha, generation)
    return Report(metrics + figures, include_tests=False).run(
        cur, ref, tags=[f"model={result.model_version}"], metadata={"model_version": result.model_version},
        name=f"pass over {result.window_size} predictions of {result.model_version}")


def _evidently_drift(reference: Reference, window: Window, alpha: float):
    """Evidently ValueDrift on the prediction, probabilities, confidence and descriptors: (snapshot, [(name, kind, method, p)])."""
    columns, metrics, cur, ref = _drift_inputs(reference, window, alpha)
    snapshot = Report(metrics, include_tests=False).run(cur, ref)
    values = {m["config"]["column"]: m["value"] for m in snapshot.dict()["metrics"]}
    out = []
    for column, kind, method in columns:
        p = float(values[column])
        out.append((column, kind, method, p if math.isfinite(p) else 1.0))
    return snapshot, out


def quality(reference: Reference, window: Window, config: MonitorConfig) -> dict:
    """Realized and estimated quality of a window (NaN where unknown); no drift test."""
    frame = window.frame
    conf = frame["confidence"].to_numpy(dtype=float)
    estimated = float(conf.mean()) if len(conf) else math.nan
    # the estimate's own uncertainty: each prediction is right with probability p (calibrated)
    est_se = float(math.sqrt(np.sum(conf * (1 - conf))) / len(conf)) if len(conf) else math.nan
    labelled = frame[frame["label"].notna()]
    n = len(labelled)
    out = {
        "estimated_accuracy": estimated,
        "estimated_accuracy_lower": max(0.0, estimated - 1.96 * est_se), "estimated_accuracy_upper": min(1.0, estimated + 1.96 * est_se),
        "estimated_accuracy_se": est_se,  # unclipped: the policy's interval arithmetic reads this, not the clipped bounds
        "labelled": n, "min_labels": config.min_labels,
        # every label in the window by provenance (core/predlog.py SOURCES); only unbiased ones are in `labelled`
        "labelled_by_source": ({str(k): int(v) for k, v in frame["label_source"].value_counts().items()}
                               if "label_source" in frame else {}),
        "realized_accuracy": math.nan, "realized_accuracy_lower": math.nan, "realized_accuracy_upper": math.nan,
        "realized_f1_macro": math.nan, "realized_f1_macro_lower": math.nan, "realized_f1_macro_upper": math.nan,
        "estimated_accuracy_labelled": math.nan, "estimation_error": math.nan,
    }
    if n >= config.min_labels:
        truth = labelled["label"].to_numpy()
        pred = labelled["prediction"].to_numpy()
        correct = int((truth == pred).sum())
        lo, hi = stats.wilson_interval(correct, n)
        names = reference.label_names
        code = {name: i for i, name in enumerate(names)}
        t_idx = np.array([code.get(t, -1) for t in truth])
        p_idx = np.array([code.get(x, -1) for x in pred])
        f1 = lambda idx: macro_f1(t_idx[idx], p_idx[idx], len(names))  # noqa: E731
        f_lo, f_hi = stats.bootstrap_interval(f1, n, rounds=config.bootstrap_rounds)
        est_labelled = float(labelled["confidence"].mean())
        out.update({
            "realized_accuracy": correct / n, "realized_accuracy_lower": lo, "realized_accuracy_upper": hi,
            "realized_f1_macro": float(f1(np.arange(n))), "realized_f1_macro_lower": f_lo, "realized_f1_macro_upper": f_hi,
            "estimated_accuracy_labelled": est_labelled, "estimation_error": est_labelled - correct / n,
        })
    return out


def macro_f1(truth: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Macro-F1 over k classes from integer codes (-1 = unknown), classes absent from both sides count 0
    like sklearn's `zero_division=0`. Vectorised: the bootstrap calls it hundreds of times a pass, where
    sklearn's f1_score took ~1 s per 300 resamples (measured)."""
    tp = np.bincount(truth[(truth == pred) & (truth >= 0)], minlength=k)[:k].astype(float)
    n_true = np.bincount(truth[truth >= 0], minlength=k)[:k]
    n_pred = np.bincount(pred[pred >= 0], minlength=k)[:k]
    denom = n_true + n_pred
    f1 = np.divide(2 * tp, denom, out=np.zeros(k), where=denom > 0)
    return float(f1.mean())


def run_pass(reference: Reference, window: Window, config: MonitorConfig) -> PassResult:
    """Test one window against its model's reference; no I/O besides what Evidently does in memory."""
    started = time.perf_counter()
    result = PassResult(
        model_version=window.model_version, status="insufficient", drift=None, window_size=window.size,
        window_first_id=window.first_id, window_last_id=window.last_id, window_start=window.start, window_end=window.end,
        alpha=config.alpha,
        reference={"n": len(reference.frame), "accuracy": reference.accuracy, "accuracy_n": reference.accuracy_n,
                   "runtime": reference.runtime, "other_runtime_rows_left_out": window.other_runtime_rows},
    )
    if window.size == 0:
        result.duration_s = time.perf_counter() - started
        return result
    result.quality = quality(reference, window, config)
    if window.size < config.min_samples:
        result.duration_s = time.perf_counter() - started
        return result

    snapshot, evidently_tests = _evidently_drift(reference, window, config.alpha)
    raw = [(name, kind, method, p, p, len(reference.frame), window.size) for name, kind, method, p in evidently_tests]
    if config.embedding_test and len(window.embeddings) >= config.min_samples and len(reference.embeddings):
        emb = stats.mmd_permutation_test(reference.embeddings, window.embeddings, permutations=config.embedding_permutations,
                                         max_samples=config.embedding_max_samples)
        raw.append(("embedding", "embedding", "mmd_permutation", emb["statistic"], emb["p_value"], emb["n_reference"], emb["n_current"]))
    p_values = [r[4] for r in raw]
    rejected = stats.holm(p_values, config.alpha)
    order = sorted(range(len(raw)), key=lambda i: p_values[i])
    thresholds = [0.0] * len(raw)
    for rank, i in enumerate(order):
        thresholds[i] = config.alpha / (len(raw) - rank)
    result.tests = [TestResult(name, kind, method, float(stat), float(p), thresholds[i], rejected[i], n_ref, n_cur)
                    for i, (name, kind, method, stat, p, n_ref, n_cur) in enumerate(raw)]
    result.drift = any(rejected)
    result.status = "ok"
    result.snapshot = snapshot
    result.duration_s = time.perf_counter() - started
    return result


def save_report(result: PassResult, directory: Path, run_id: int) -> Path | None:
    """Evidently's HTML report of this pass, named by its run id; `latest.html` points at the newest."""
    if result.snapshot is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"monitor-{run_id}.html"
    tmp = path.with_suffix(".tmp")
    result.snapshot.save_html(str(tmp))
    tmp.replace(path)  # a reader never sees half a report
    return path
