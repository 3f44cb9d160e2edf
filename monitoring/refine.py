"""`driftloop refine`: fine-tune the champion on fresh labelled traffic, gate it, promote it or not.

1. Fresh data: predictions the champion served that received feedback (text stored), deduplicated,
   optionally from a given log id on (the controller passes the start of the drift streak), split
   stratified into training rows and a held-out **gate set**.
2. Replay: a sample of the champion's own training split (`replay_ratio` rows per fresh training row)
   so the challenger does not forget; optionally self-training rows (confident unlabelled traffic).
3. Fine-tune **from the champion's weights** (not the base model): short schedule, lower learning
   rate, early stopping; then average the weights with the champion's (WiSE-FT, finetune/averaging.py:
   α picked on the refinement's own validation split), which keeps the gain and most of what the
   champion knew; registered with its lineage (parent, trigger, data window, monitor runs, α).
4. Gate (monitoring/gate.py) on the gate set (fresh, never trained on) and on the frozen regression
   set (the champion's validation rows): promote only on a significant gain that forgets ≤ epsilon.

Runs as its own process (the controller starts it), so serving and monitoring never stall.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.engine import Engine

from finetune import alias, profile, registry
from finetune.averaging import average_with_start
from finetune.config import TrainConfig, apply_overrides
from finetune.errors import DriftloopError
from finetune.home import runs_dir
from monitoring import audit, predlog
from monitoring.gate import GateConfig, GateResult, evaluate as gate_evaluate

log = logging.getLogger("driftloop.refine")


class RefineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate_fraction: float = Field(0.3, gt=0, lt=0.9, description="Share of fresh labels held out for the gate.")
    min_fresh_labels: int = Field(60, ge=2, description="Fewer fresh labels: refuse to refine.")
    max_fresh_labels: int = Field(20_000, ge=10)
    replay_ratio: float = Field(1.0, ge=0, description="Replayed champion training rows per fresh training row.")
    self_training: bool = Field(False, description="Add confident unlabelled traffic with its predicted label.")
    self_training_min_confidence: float = Field(0.97, gt=0.5, le=1.0)
    self_training_max_rows: int = Field(500, ge=0)
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(1e-4, gt=0, description="Lower than training from the base model: small steps from the champion.")
    batch_size: int = Field(32, ge=1)
    early_stopping_patience: int = Field(1, ge=0)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42
    weight_averaging: bool = Field(True, description=(
        "Average the refined weights with the champion's (WiSE-FT): keeps the gain on the new domain "
        "without forgetting the old one (docs/benchmarks.md)."))
    averaging_alphas: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.5], min_length=1, description=(
        "alpha of the average (0 = the champion, 1 = the refined model); several = pick one on the refinement's "
        "validation split. Fixed 0.5 by default: that split (fresh labels + replayed training-split rows) "
        "cannot see forgetting on the old domain's unseen data, and picking on it chose 1.0 in a measured run."))
    promote: bool = Field(True, description="Promote when the gate passes (False: register and gate only).")
    gate: GateConfig = GateConfig()


def fresh_labelled(engine: Engine, model_version: str, since_id: int | None, limit: int) -> list[tuple[int, str, str]]:
    """(log id, text, label) of labelled predictions of `model_version`, newest `limit`, deduplicated by text."""
    c = predlog.predictions.c
    q = (select(c.id, c.text, c.feedback_label).where(c.model_version == model_version, c.feedback_label.is_not(None),
                                                       c.text.is_not(None)).order_by(c.id.desc()).limit(limit))
    if since_id is not None:
        q = q.where(c.id >= since_id)
    seen, out = set(), []
    with engine.connect() as conn:
        for rid, text, label in conn.execute(q):
            if text not in seen:
                seen.add(text)
                out.append((rid, text, label))
    return out[::-1]


def confident_unlabelled(engine: Engine, model_version: str, since_id: int | None, min_conf: float, limit: int) -> list[tuple[str, str]]:
    c = predlog.predictions.c
    q = (select(c.text, c.label).where(c.model_version == model_version, c.feedback_label.is_(None), c.text.is_not(None),
                                       c.confidence >= min_conf).order_by(c.id.desc()).limit(limit))
    if since_id is not None:
        q = q.where(c.id >= since_id)
    with engine.connect() as conn:
        return [(t, y) for t, y in conn.execute(q)]


def stratified_split(rows: list, key, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out `fraction` of each class (at least one per class with ≥ 2 rows)."""
    rng = random.Random(seed)
    by_class: dict[str, list] = {}
    for row in rows:
        by_class.setdefault(key(row), []).append(row)
    train, held = [], []
    for items in by_class.values():
        rng.shuffle(items)
        n_held = max(1, round(len(items) * fraction)) if len(items) >= 2 else 0
        held += items[:n_held]
        train += items[n_held:]
    return train, held


def correct_flags(predictor, texts: list[str], labels: list[str]) -> np.ndarray:
    if not texts:
        return np.zeros(0, dtype=bool)
    out = predictor.predict(texts)
    names = predictor.label_names
    return np.array([names[i] == y for i, y in zip(out.labels, labels)], dtype=bool)


def run(engine: Engine, config: RefineConfig, *, trigger: str = "manual", since_id: int | None = None,
        monitor_runs: list[int] | None = None, quiet: bool = True) -> dict:
    """The whole refinement; returns a JSON summary (also recorded in the audit trail)."""
    from finetune.pipeline import build_lineage, evaluate, load_data, register_fitted  # noqa: PLC0415
    from finetune.training import fit  # noqa: PLC0415

    started = time.perf_counter()
    predlog.ensure_schema(engine)
    state = alias.current(engine=engine)
    if state is None:
        raise DriftloopError("no production model to refine: train and promote one first")
    champion = registry.get(state.tag)
    label_names = list(champion.lineage["label_names"])

    fresh = fresh_labelled(engine, champion.tag, since_id, config.max_fresh_labels)
    fresh = [r for r in fresh if r[2] in label_names]
    if len(fresh) < config.min_fresh_labels:
        raise DriftloopError(f"only {len(fresh)} fresh labelled predictions of {champion.tag} with text"
                             f"{f' since log id {since_id}' if since_id else ''} (< {config.min_fresh_labels})")
    fresh_train, gate_rows = stratified_split(fresh, key=lambda r: r[2], fraction=config.gate_fraction, seed=config.seed)

    # replay: the champion's own training split, re-derived from its lineage (same data, seed, split)
    champ_cfg = TrainConfig.model_validate(champion.lineage["config"])
    replay: list[tuple[str, str]] = []
    if config.replay_ratio > 0:
        try:
            champ_data = load_data(champ_cfg, label_names=label_names)
            pool = list(zip(champ_data.train.texts, (label_names[y] for y in champ_data.train.labels)))
            random.Random(config.seed).shuffle(pool)
            replay = pool[: int(round(len(fresh_train) * config.replay_ratio))]
        except DriftloopError as err:
            log.warning("no replay data (champion's training data unavailable: %s)", err)
    pseudo = confident_unlabelled(engine, champion.tag, since_id, config.self_training_min_confidence,
                                  config.self_training_max_rows) if config.self_training else []

    # scratch under $DRIFTLOOP_HOME/runs (safe to delete when nothing runs), removed when the refinement ends
    work = Path(tempfile.mkdtemp(prefix="refine-", dir=runs_dir()))
    train_file = work / "refine.tsv"
    gate_texts = {t for _, t, _ in gate_rows}
    mix = [(t, y) for _, t, y in fresh_train] + replay + [(t, y) for t, y in pseudo if t not in gate_texts]
    with open(train_file, "w", encoding="utf-8") as fh:
        fh.write("text\tlabel\n")
        for text, label in mix:
            fh.write(f"{' '.join(text.split())}\t{label}\n")

    overrides = {
        "data.path": str(train_file), "data.text_column": "text",
        "data.label_column": "label", "data.val_fraction": config.val_fraction,
        "training.epochs": config.epochs, "training.learning_rate": config.learning_rate,
        "training.batch_size": config.batch_size, "training.early_stopping_patience": config.early_stopping_patience,
        "training.seed": config.seed, "training.augment": "none", "training.oversample": False,
        "registry.parent": champion.tag, "registry.promote": "never", "report": False,
    }
    raw = apply_overrides(champion.lineage["config"], overrides)
    raw["data"].update({"test_path": None, "max_rows": None})  # apply_overrides skips None values
    cfg = TrainConfig.model_validate(raw)
    audit.record(engine, "retrain_started", champion.tag, trigger=trigger, since_id=since_id, monitor_runs=monitor_runs or [],
                 fresh_train=len(fresh_train), gate=len(gate_rows), replay=len(replay), self_training=len(pseudo))
    data = load_data(cfg, label_names=label_names)
    fitted = fit(cfg, data, init_from=str(champion.path), quiet=quiet, progress=not quiet)
    averaging = None
    if config.weight_averaging:
        start_state = registry.load_predictor(champion.tag, device="cpu").model.state_dict()
        averaging = average_with_start(fitted.model, start_state, fitted.tokenizer, label_names, data.val,
                                       config.averaging_alphas, max_length=cfg.model.max_length).to_json()
        log.info("weight averaging with the champion: alpha %s (validation accuracy by alpha %s)",
                 averaging["alpha"], averaging["val_accuracy_by_alpha"])
    ev = evaluate(cfg, fitted, data)
    refinement = {
        "trigger": trigger, "parent": champion.tag, "since_id": since_id, "monitor_runs": monitor_runs or [],
        "fresh_labels": len(fresh), "fresh_train": len(fresh_train), "gate_items": len(gate_rows),
        "fresh_log_ids": [fresh[0][0], fresh[-1][0]], "replay_rows": len(replay), "self_training_rows": len(pseudo),
        "refine_config": config.model_dump(mode="json"), "weight_averaging": averaging,
    }
    lineage = build_lineage(cfg, fitted, data, ev, champion.tag, started, extra={"refinement": refinement})
    outcome = register_fitted(cfg, fitted, data, ev, lineage)
    challenger_tag = outcome.tag

    # gate: same items for both models
    champ_pred = registry.load_predictor(champion.tag)
    chall_pred = registry.load_verified(challenger_tag)  # a challenger that does not load fails the refinement here
    g_texts, g_labels = [t for _, t, _ in gate_rows], [y for _, _, y in gate_rows]
    reg_frame, _ = profile.load(champion.path)
    r_texts, r_labels = reg_frame["text"].tolist(), reg_frame["label"].tolist()
    result: GateResult = gate_evaluate(correct_flags(champ_pred, g_texts, g_labels), correct_flags(chall_pred, g_texts, g_labels),
                                       correct_flags(champ_pred, r_texts, r_labels), correct_flags(chall_pred, r_texts, r_labels),
                                       config.gate)
    audit.record(engine, "gate", challenger_tag, champion=champion.tag, **result.to_json())
    promoted = False
    if result.passed and config.promote:
        current = alias.current(engine=engine)
        if current is None or current.tag != champion.tag:
            result.reasons.append(f"production moved to {current.tag if current else None} meanwhile: not promoting")
        else:
            alias.promote(challenger_tag, reason=f"refinement gate passed ({trigger})", actor="controller", engine=engine)
            promoted = True
            audit.record(engine, "promotion", challenger_tag, previous=champion.tag,
                         previous_gate_accuracy=result.champion_fresh_accuracy, gate_accuracy=result.challenger_fresh_accuracy)
    summary = {
        "challenger": challenger_tag, "champion": champion.tag, "promoted": promoted, "gate": result.to_json(),
        "refinement": refinement, "val_metrics": outcome.metrics.get("val"), "seconds": round(time.perf_counter() - started, 1),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    audit.record(engine, "retrain_succeeded", challenger_tag, promoted=promoted, seconds=summary["seconds"],
                 gate_passed=result.passed, reasons=result.reasons)
    shutil.rmtree(work, ignore_errors=True)
    return summary
