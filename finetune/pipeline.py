"""`driftloop train` end to end: data → fit → evaluate → calibrate → profile → report → register.

Registration is the last step and happens only after evaluation succeeded; until then nothing is
written to the store or the production alias, so a failure (or SIGKILL) at any point registers
nothing.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import numpy as np

from core import alias, data_store, production, profile, registry
from core.inference import Predictions, Predictor
from finetune.config import TrainConfig
from finetune.data import PreparedData, prepare
from finetune.evaluation import classification_metrics, fit_temperature, softmax
from finetune.training import FitResult, fit


@dataclass
class TrainOutcome:
    tag: str
    metrics: dict
    report_path: str | None
    promoted: bool
    lineage: dict

    def to_json(self) -> dict:
        return {"model": self.tag, "metrics": self.metrics, "report": self.report_path, "promoted": self.promoted,
                "temperature": self.lineage["temperature"], "data": self.lineage["data"],
                "training": self.lineage["training"]}


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("driftloop", "torch", "transformers", "accelerate", "bentoml"):
        try:
            out[pkg] = importlib_metadata.version(pkg)
        except importlib_metadata.PackageNotFoundError:
            pass
    return out


def load_data(config: TrainConfig, label_names: list[str] | None = None) -> PreparedData:
    d = config.data
    return prepare(d.path, test_source=d.test_path, text_column=d.text_column, label_column=d.label_column,
                   max_rows=d.max_rows, val_fraction=d.val_fraction, seed=config.training.seed,
                   max_chars=d.max_chars, deduplicate=d.deduplicate, label_names=label_names)


@dataclass
class Evaluation:
    temperature: float
    metrics: dict
    val_logits: np.ndarray
    val_preds: object
    test_logits: np.ndarray | None
    truncated: dict[str, int]


def evaluate(config: TrainConfig, fitted: FitResult, data: PreparedData) -> Evaluation:
    """Validation (fits the temperature) and test metrics, from the serving code path."""
    predictor = Predictor(fitted.model, fitted.tokenizer, data.label_names, max_length=config.model.max_length)
    batch = config.training.eval_batch_size
    val = predictor.predict(data.val.texts, batch_size=batch)
    val_y = np.asarray(data.val.labels)
    temperature = fit_temperature(val.logits, val_y) if config.calibration.temperature_scaling else 1.0
    val.probs = softmax(val.logits, temperature).astype(np.float32)
    bins = config.calibration.ece_bins
    metrics = {"val": classification_metrics(val.logits, val_y, data.label_names, temperature, bins)}
    truncated = {"train": fitted.truncated_train_texts, "val": int(sum(val.truncated))}
    test_logits = None
    if data.test is not None:
        test = predictor.predict(data.test.texts, batch_size=batch)
        test_logits = test.logits
        metrics["test"] = classification_metrics(test.logits, np.asarray(data.test.labels), data.label_names, temperature, bins)
        truncated["test"] = int(sum(test.truncated))
    return Evaluation(temperature, metrics, val.logits, val, test_logits, truncated)


def predict_calibrated(config: TrainConfig, fitted: FitResult, label_names: list[str], texts: list[str],
                       temperature: float) -> Predictions:
    """The fitted model's predictions through the serving code path, probabilities calibrated with `temperature`."""
    predictor = Predictor(fitted.model, fitted.tokenizer, label_names, max_length=config.model.max_length)
    out = predictor.predict(texts, batch_size=config.training.eval_batch_size)
    out.probs = softmax(out.logits, temperature).astype(np.float32)
    return out


def root_data_lineage(data: PreparedData, ev: Evaluation, source: str | None = None) -> dict:
    """Generation 0's durable data: its training split (what later refinements replay) and its
    validation split (the first rows of the cumulative regression suite, never trained on)."""
    names = data.label_names
    own = data_store.put((t, names[y]) for t, y in zip(data.train.texts, data.train.labels))
    suite = data_store.put((t, names[y]) for t, y in zip(data.val.texts, data.val.labels))
    val = ev.metrics["val"]
    part = {"name": "g0", "generation": 0, "domain": f"validation split of {source or 'the training data'}", "n": len(data.val)}
    return {
        "data_lineage": {"generation": 0, "own": own.to_json(), "regression_suite": suite.to_json(),
                         "regression_suite_parts": [part] if len(data.val) else []},
        "suite_accuracy_by_part": [{**part, "accuracy": val["accuracy"]}] if len(data.val) else [],
        "reference": {"accuracy": val["accuracy"], "n": len(data.val), "source": "validation split",
                      "profile_rows": len(data.val), "profile_source": "validation split"},
    }


def build_lineage(config: TrainConfig, fitted: FitResult, data: PreparedData, ev: Evaluation,
                  parent: str | None, started: float, extra: dict | None = None) -> dict:
    return {
        "kind": "driftloop-classifier",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "parent": parent,
        "base_model": config.model.base_model,
        "init_from": fitted.source,
        "label_names": data.label_names,
        "max_length": config.model.max_length,
        "temperature": ev.temperature,
        "metrics": ev.metrics,
        "data": data.fingerprint(),
        "cleaning": data.cleaning,
        "truncated_texts": ev.truncated,
        "config": config.model_dump(mode="json"),
        "device": fitted.device,
        "world_size": fitted.world_size,
        "versions": library_versions(),
        "training": {
            "train_seconds": round(fitted.train_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "train_rows": fitted.train_rows,
            "epochs_run": fitted.epochs_run,
            "samples_per_second": round(fitted.samples_per_second, 2),
            "class_weights": fitted.class_weights,
            "train_loss": fitted.extra.get("train_loss"),
            "best_val_metric": fitted.extra.get("best_metric"),
        },
        **(extra or {}),
    }


def register_fitted(config: TrainConfig, fitted: FitResult, data: PreparedData, ev: Evaluation, lineage: dict,
                    promote_reason: str = "trained",
                    reference: tuple[list[str], list[int | None], Predictions] | None = None) -> TrainOutcome:
    """Write weights, tokenizer, profile and report into a new store entry, then maybe promote.

    The reference profile is the validation split unless `reference` (texts, label index or None,
    calibrated predictions) says what the model will serve instead (a refinement: recent traffic).
    """
    ref_texts, ref_labels, ref_preds = reference or (data.val.texts, data.val.labels, ev.val_preds)
    frame, embeddings = profile.build(ref_texts, ref_labels, data.label_names, ref_preds)
    report_html: list[str] = []

    def write_files(directory: Path, tag: str) -> None:
        fitted.model.save_pretrained(directory, safe_serialization=True)
        fitted.tokenizer.save_pretrained(directory)
        profile.save(directory, frame, embeddings)
        if config.report:
            from finetune import report  # noqa: PLC0415 - matplotlib (0.4 s) only when a report is wanted

            eval_split = "test" if data.test is not None else "val"
            eval_logits = ev.test_logits if data.test is not None else ev.val_logits
            eval_labels = np.asarray((data.test or data.val).labels)
            page = report.render(tag=tag, lineage=lineage, log_history=fitted.log_history,
                                 eval_split=eval_split, eval_logits=eval_logits, eval_labels=eval_labels,
                                 val_logits=ev.val_logits, val_labels=np.asarray(data.val.labels))
            (directory / registry.REPORT_FILE).write_text(page, encoding="utf-8")
            report_html.append(registry.REPORT_FILE)

    labels = {"driftloop": "classifier", **config.registry.labels}
    if lineage.get("parent"):
        labels["parent"] = lineage["parent"].replace(":", "_")
    tag = registry.register(config.registry.name, write_files, lineage, labels)
    path = registry.get(tag).path
    promoted = False
    mode = config.registry.promote
    if mode == "always" or (mode == "auto" and alias.current() is None):
        production.promote(tag, reason=promote_reason, actor="train", verify=False)
        promoted = True
    return TrainOutcome(tag, ev.metrics, str(path / registry.REPORT_FILE) if report_html else None, promoted, lineage)


def train(config: TrainConfig, *, quiet: bool = False, progress: bool = True) -> TrainOutcome | None:
    """The whole `driftloop train`; returns None on non-zero DDP ranks (rank 0 registers)."""
    started = time.perf_counter()
    data = load_data(config)
    fitted = fit(config, data, quiet=quiet, progress=progress)
    if not fitted.is_main_process:
        return None
    ev = evaluate(config, fitted, data)
    lineage = build_lineage(config, fitted, data, ev, config.registry.parent, started, extra=root_data_lineage(data, ev, source=config.data.path))
    return register_fitted(config, fitted, data, ev, lineage)
