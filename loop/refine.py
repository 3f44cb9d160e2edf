"""`driftloop refine`: fine-tune the champion on fresh labelled traffic, gate it, promote it or not.

Built to run generation after generation: everything a refinement needs from the past is durable
(core/data_store.py, referenced from each model's lineage), never in scratch.

1. Fresh data: predictions the champion served that received feedback (text stored), deduplicated,
   optionally from a given log id on (the controller passes the start of the drift streak), minus
   any text of the regression suite, split stratified into training rows and a held-out **gate set**.
2. Replay from **every ancestor**: each generation's own rows (generation 0: its training split; a
   refinement: its fresh labelled rows) are stored; `replay_ratio` rows per fresh training row are
   shared out equally between the generations (`allocate`), so the first domain is still replayed
   ten generations later. The lineage records how many rows came from each generation.
3. Fine-tune **from the champion's weights**: short schedule, lower learning rate, early stopping;
   then average the weights with the champion's (WiSE-FT, finetune/averaging.py).
4. The challenger's **reference profile** is what it will serve: its own predictions on the newest
   traffic of the champion (the drift streak's texts, `reference_rows`, at least
   `min_reference_rows`); its **reference accuracy** comes from the same population: its accuracy
   on the gate items (labelled rows of that traffic, never trained on). The regression suite is
   mostly earlier domains: after a promotion into a harder domain, realized accuracy there sits
   below the suite's accuracy, and every later benign drift would be "confirmed" by performance.
   Both figures are in the lineage (`reference.accuracy`, `reference.suite_accuracy`).
5. Gate (loop/gate.py): superiority on the gate set (fresh, never trained on) and
   non-inferiority on the **cumulative regression suite** (the first champion's held-out rows plus
   every promoted generation's gate items, never trained on), pooled and **per part** (loop/suite.py:
   one part per generation, Holm across parts). The challenger's own suite is its champion's plus
   its gate items as a new part, so the suite grows with each promotion.
6. Promotion through `core.production.promote`, fenced with the controller's lease term.

Runs as its own process (the controller starts it), so serving and monitoring never stall.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sqlalchemy.engine import Connection, Engine

from core import alias, audit, data_store, inference, predlog, production, profile, registry, retention, runtimes
from core.data_store import DatasetRef, Row
from core.errors import DriftloopError
from core.inference import Predictor
from core.registry import RegisteredModel
from finetune.averaging import average_with_start
from finetune.config import TrainConfig, apply_overrides
from finetune.pipeline import build_lineage, evaluate, load_data, predict_calibrated, register_fitted
from finetune.training import fit
from loop.gate import GateResult
from loop.gate import evaluate as gate_evaluate
from loop import suite as suite_parts
from loop.refine_config import RefineConfig

log = logging.getLogger("driftloop.refine")


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


# --------------------------------------------------------------------------- durable data lineage


def ancestry(champion: RegisteredModel) -> list[RegisteredModel]:
    """The champion, its parent, ... up to the first model (or the first ancestor no longer in the store)."""
    chain, seen, model = [], set(), champion
    while model is not None and model.tag not in seen:
        chain.append(model)
        seen.add(model.tag)
        parent = model.lineage.get("parent")
        if not parent:
            break
        try:
            model = registry.get(parent)
        except DriftloopError as err:
            log.warning("ancestry of %s stops at %s: %s", champion.tag, model.tag, err)
            break
    return chain


def generation_of(model: RegisteredModel) -> int:
    gen = (model.lineage.get("data_lineage") or {}).get("generation")
    return int(gen) if gen is not None else len(ancestry(model)) - 1


def own_rows(model: RegisteredModel, label_names: list[str]) -> list[Row]:
    """The rows this generation added: its stored dataset; for a model registered before datasets
    were stored, its training split re-derived from its config (if that file still exists)."""
    ref = DatasetRef.from_json((model.lineage.get("data_lineage") or {}).get("own"))
    if ref is not None:
        return data_store.get(ref)
    try:
        data = load_data(TrainConfig.model_validate(model.lineage["config"]), label_names=label_names)
    except DriftloopError as err:
        log.warning("no replay rows from %s (registered without a stored dataset; %s)", model.tag, err)
        return []
    return [(t, label_names[y]) for t, y in zip(data.train.texts, data.train.labels)]


def regression_suite(model: RegisteredModel) -> list[Row]:
    """The model's cumulative regression suite; for an older model, its reference (validation) rows."""
    ref = DatasetRef.from_json((model.lineage.get("data_lineage") or {}).get("regression_suite"))
    if ref is not None:
        return data_store.get(ref)
    frame, _ = profile.load(model.path)
    return list(zip(frame["text"].tolist(), frame["label"].tolist()))


def _starts(parts: list) -> list[int]:
    out, start = [], 0
    for p in parts:
        out.append(start)
        start += p.n
    return out


def allocate(budget: int, sizes: dict[str, int]) -> dict[str, int]:
    """Share `budget` rows equally between generations, capped by what each has (water-filling):
    every past domain keeps an equal voice however many generations ago it was learnt."""
    out = {key: 0 for key in sizes}
    left = {key: n for key, n in sizes.items() if n > 0}
    remaining = budget
    while remaining > 0 and left:
        share = max(1, remaining // len(left))
        for key in sorted(left, key=lambda k: left[k]):
            take = min(share, left[key], remaining)
            out[key] += take
            left[key] -= take
            remaining -= take
            if remaining == 0:
                break
        left = {key: n for key, n in left.items() if n > 0}
    return out


def split_fresh(fresh: list[tuple[int, str, str, str]], config: RefineConfig) -> tuple[list, list]:
    """(training rows, gate items) from a refinement's fresh labelled rows (id, text, label, source).
    Gate items come only from unbiased labels (organic, requested at random): a gate scored on the
    items the model was least sure of would judge both models on a sample chosen against the champion
    (core/predlog.py UNBIASED). Informative labels all train."""
    unbiased = [r for r in fresh if r[3] in predlog.UNBIASED]
    informative = [r for r in fresh if r[3] not in predlog.UNBIASED]
    train, gate = stratified_split(unbiased, key=lambda r: r[2], fraction=config.gate_fraction, seed=config.seed)
    return sorted(train + informative), gate


def replay_rows(chain: list[RegisteredModel], label_names: list[str], budget: int, exclude: set[str],
                seed: int) -> tuple[list[Row], dict[str, int]]:
    """Rows replayed from every generation in `chain` (minus `exclude`d texts), and how many from each."""
    pools = {}
    for model in chain:
        rows = [(t, y) for t, y in own_rows(model, label_names) if t not in exclude and y in label_names]
        random.Random(f"{seed}:{model.tag}").shuffle(rows)
        pools[model.tag] = rows
    counts = allocate(budget, {tag: len(rows) for tag, rows in pools.items()})
    picked = [row for tag, rows in pools.items() for row in rows[:counts[tag]]]
    return picked, {tag: n for tag, n in counts.items()}


def run(engine: Engine, config: RefineConfig, *, trigger: str = "manual", since_id: int | None = None,
        monitor_runs: list[int] | None = None, quiet: bool = True, fence: Callable[[Connection], None] | None = None) -> dict:
    """The whole refinement; returns a JSON summary (also recorded in the audit trail). `fence` is
    the controller's lease check, run inside the promotion's transaction. While it runs, a hold keeps
    the champion's log rows from `since_id` on whole (core/retention.py): its fresh rows and the
    traffic it profiles for the challenger's reference; a refinement killed outright leaves a hold
    that expires after retention's hold_ttl_s."""
    predlog.ensure_schema(engine)
    state = alias.current(engine=engine)
    hold_id = retention.hold(engine, state.tag, since_id or 0, f"refinement ({trigger}): fresh rows and reference profile") if state else None
    try:
        return _run(engine, config, trigger=trigger, since_id=since_id, monitor_runs=monitor_runs, quiet=quiet, fence=fence)
    finally:
        if hold_id is not None:
            retention.release(engine, hold_id)


Fresh = tuple[int, str, str, str]  # (log id, text, label, source): predlog.fresh_labelled


@dataclass
class _Inputs:
    """Everything a refinement trains and is gated on, read before training starts."""
    champion: RegisteredModel
    label_names: list[str]
    suite: list[Row]  # the champion's regression suite (its label set only)
    parts: list[suite_parts.Part]
    fresh: list[Fresh]
    fresh_train: list[Fresh]
    gate_rows: list[Fresh]
    replay: list[Row]
    replay_by_generation: dict
    pseudo: list[Row]
    own_ref: DatasetRef
    mix_ref: DatasetRef

    @property
    def items(self) -> dict[str, tuple[list[str], list[str]]]:
        """The gate's two item sets as (texts, labels): fresh gate items, then the regression suite."""
        return {"fresh": ([t for _, t, _, _ in self.gate_rows], [y for _, _, y, _ in self.gate_rows]),
                "suite": ([t for t, _ in self.suite], [y for _, y in self.suite])}


def _gather(engine: Engine, config: RefineConfig, since_id: int | None) -> _Inputs:
    """Steps 1-2: the champion, its suite, the fresh rows split into training rows and gate items,
    replay from every ancestor, optional pseudo-labels; the training mix stored in the dataset store."""
    state = alias.current(engine=engine)
    if state is None:
        raise DriftloopError("no production model to refine: train and promote one first")
    champion = registry.get(state.tag)
    label_names = list(champion.lineage["label_names"])
    stored_suite = regression_suite(champion)
    suite, parts = suite_parts.keep_labels(stored_suite, suite_parts.parts_of(champion.lineage, len(stored_suite)), label_names)
    suite_texts = {t for t, _ in suite}

    fresh = predlog.fresh_labelled(engine, champion.tag, since_id, config.max_fresh_labels)
    fresh = [r for r in fresh if r[2] in label_names and r[1] not in suite_texts]
    if len(fresh) < config.min_fresh_labels:
        raise DriftloopError(f"only {len(fresh)} fresh labelled predictions of {champion.tag} with text"
                             f"{f' since log id {since_id}' if since_id else ''} (< {config.min_fresh_labels})")
    fresh_train, gate_rows = split_fresh(fresh, config)
    gate_texts = {t for _, t, _, _ in gate_rows}

    chain = ancestry(champion)
    budget = int(round(len(fresh_train) * config.replay_ratio))
    replay, replay_by_generation = replay_rows(chain, label_names, budget, suite_texts | gate_texts, config.seed)
    if budget and not replay:
        log.warning("no replay rows from any of %d ancestor generation(s)", len(chain))
    pseudo = predlog.confident_unlabelled(engine, champion.tag, since_id, config.self_training_min_confidence,
                                          config.self_training_max_rows) if config.self_training else []
    own = [(t, y) for _, t, y, _ in fresh_train]
    mix = own + replay + [(t, y) for t, y in pseudo if t not in gate_texts and t not in suite_texts]
    return _Inputs(champion, label_names, suite, parts, fresh, fresh_train, gate_rows, replay, replay_by_generation, pseudo,
                   data_store.put(own), data_store.put(mix))


def _train_config(config: RefineConfig, inputs: _Inputs) -> TrainConfig:
    """Step 3's settings: the champion's own training config, on the mix, with the refinement's schedule."""
    overrides = {
        "data.path": str(data_store.path_of(inputs.mix_ref)), "data.text_column": "text",
        "data.label_column": "label", "data.val_fraction": config.val_fraction,
        "training.epochs": config.epochs, "training.learning_rate": config.learning_rate,
        "training.batch_size": config.batch_size, "training.early_stopping_patience": config.early_stopping_patience,
        "training.seed": config.seed, "training.augment": "none", "training.oversample": False,
        "registry.parent": inputs.champion.tag, "registry.promote": "never", "report": False,
    }
    raw = apply_overrides(inputs.champion.lineage["config"], overrides)
    raw["data"].update({"test_path": None, "max_rows": None})  # apply_overrides skips None values
    return TrainConfig.model_validate(raw)


def _grown_suite(config: RefineConfig, inputs: _Inputs, torch_flags: dict[str, np.ndarray], generation: int,
                 shift: str) -> tuple[list[suite_parts.Part], DatasetRef, list[dict]]:
    """The challenger's suite (its champion's plus its gate items as a new part, stored) and its
    PyTorch accuracy on every part, the new one included."""
    new_suite, new_parts = suite_parts.extend(inputs.suite, inputs.parts, [(t, y) for _, t, y, _ in inputs.gate_rows], generation,
                                              shift, config.suite_part_cap, seed=config.seed)
    by_text = {t: ok for t, ok in zip(inputs.items["fresh"][0], torch_flags["fresh"])}
    own_part = [by_text[t] for t, _ in new_suite[len(inputs.suite):]]
    blocks = [torch_flags["suite"][a:a + p.n] for p, a in zip(inputs.parts, _starts(inputs.parts))] + [own_part]
    part_accuracy = [{**p.to_json(), "accuracy": float(np.mean(block)) if len(block) else None} for p, block in zip(new_parts, blocks)]
    return new_parts, data_store.put(new_suite), part_accuracy


def _reference_profile(engine: Engine, config: RefineConfig, inputs: _Inputs, since_id: int | None, cfg: TrainConfig,
                       fitted, temperature: float) -> tuple[tuple | None, str]:
    """Step 4's profile: the challenger's calibrated predictions on the champion's newest traffic
    (None: too little logged, the validation split stands in), and where it came from."""
    ref_texts = predlog.recent_texts(engine, inputs.champion.tag, since_id, config.reference_rows)
    if len(ref_texts) < config.min_reference_rows:
        source = f"validation split (only {len(ref_texts)} logged texts < {config.min_reference_rows})"
        log.warning("reference profile from the validation split: %s", source)
        return None, source
    known = {t: inputs.label_names.index(y) for _, t, y, _ in inputs.fresh}
    preds = predict_calibrated(cfg, fitted, inputs.label_names, ref_texts, temperature)
    source = f"newest {len(ref_texts)} texts served by {inputs.champion.tag}" + (f" from log id {since_id}" if since_id else "")
    return (ref_texts, [known.get(t) for t in ref_texts], preds), source


def _gate_and_promote(engine: Engine, config: RefineConfig, inputs: _Inputs, scorers: dict, challenger_tag: str, trigger: str,
                      fence: Callable[[Connection], None] | None) -> tuple[GateResult, bool, dict]:
    """Steps 5-6: both models scored on the same items by `scorers` (the runtime that serves), the
    gate recorded, and the challenger promoted if it passed and promotion is on; returns (gate,
    promoted, what scored)."""
    champion = inputs.champion
    flags = {name: tuple(correct_flags(scorers[who], texts, labels) for who in ("champion", "challenger"))
             for name, (texts, labels) in inputs.items.items()}
    scored_with = {who: {"runtime": p.runtime, "note": p.runtime_note} for who, p in scorers.items()}
    result: GateResult = gate_evaluate(flags["fresh"][0], flags["fresh"][1], flags["suite"][0], flags["suite"][1], config.gate,
                                       parts=[(p.name, p.n) for p in inputs.parts])
    audit.record(engine, "gate", challenger_tag, champion=champion.tag, scored_with=scored_with, **result.to_json())
    if not (result.passed and config.promote):
        return result, False, scored_with
    checks = [c for c in (fence, alias.still_at(champion.tag)) if c is not None]
    try:
        production.promote(challenger_tag, reason=f"refinement gate passed ({trigger})", actor="controller", engine=engine,
                           fence=lambda conn: [check(conn) for check in checks], verify=False,
                           previous_gate_accuracy=result.champion_fresh_accuracy, gate_accuracy=result.challenger_fresh_accuracy)
        return result, True, scored_with
    except DriftloopError as err:
        result.reasons.append(str(err))
        log.warning("not promoted: %s", err)
        return result, False, scored_with


def _run(engine: Engine, config: RefineConfig, *, trigger: str, since_id: int | None, monitor_runs: list[int] | None,
         quiet: bool, fence: Callable[[Connection], None] | None) -> dict:
    started = time.perf_counter()
    inputs = _gather(engine, config, since_id)
    champion, label_names = inputs.champion, inputs.label_names
    cfg = _train_config(config, inputs)
    audit.record(engine, "retrain_started", champion.tag, trigger=trigger, since_id=since_id, monitor_runs=monitor_runs or [],
                 fresh_train=len(inputs.fresh_train), gate=len(inputs.gate_rows), replay=len(inputs.replay),
                 self_training=len(inputs.pseudo), replay_by_generation=inputs.replay_by_generation, regression_suite=len(inputs.suite))
    data = load_data(cfg, label_names=label_names)
    fitted = fit(cfg, data, init_from=str(champion.path), quiet=quiet, progress=not quiet)
    averaging = None
    champ_pred = inference.load_predictor(champion.tag, device="cpu")
    if config.weight_averaging:
        averaging = average_with_start(fitted.model, champ_pred.model.state_dict(), fitted.tokenizer, label_names, data.val,
                                       config.averaging_alphas, max_length=cfg.model.max_length).to_json()
        log.info("weight averaging with the champion: alpha %s (validation accuracy by alpha %s)",
                 averaging["alpha"], averaging["val_accuracy_by_alpha"])
    ev = evaluate(cfg, fitted, data)

    # gate items and the regression suite: the challenger's PyTorch accuracy on them is its reference
    # accuracy (lineage); the gate scores both models on the same items with the runtime that serves
    choice = runtimes.serving_choice(config.serving_runtime, config.int8_tolerance_pt,
                                     observed=predlog.recent_runtime(engine, champion.tag))
    chall_pred = Predictor(fitted.model, fitted.tokenizer, label_names, max_length=cfg.model.max_length)
    torch_flags = {name: correct_flags(chall_pred, texts, labels) for name, (texts, labels) in inputs.items.items()}
    generation = generation_of(champion) + 1
    shift = f"the shift {trigger} refined for" + (f" (log ids from {since_id})" if since_id else "")
    new_parts, suite_ref, part_accuracy = _grown_suite(config, inputs, torch_flags, generation, shift)
    reference, profile_source = _reference_profile(engine, config, inputs, since_id, cfg, fitted, ev.temperature)

    data_lineage = {
        "generation": generation, "own": inputs.own_ref.to_json(), "mix": inputs.mix_ref.to_json(),
        "replay_by_generation": inputs.replay_by_generation, "fresh_rows": len(inputs.fresh_train),
        "self_training_rows": len(inputs.pseudo), "regression_suite": suite_ref.to_json(),
        "regression_suite_parts": [p.to_json() for p in new_parts],
    }
    gate_correct, suite_correct = torch_flags["fresh"], torch_flags["suite"]
    reference_info = {"accuracy": float(gate_correct.mean()) if gate_correct.size else None, "n": int(gate_correct.size),
                      "source": "gate items (labelled rows of the traffic the profile comes from)",
                      "suite_accuracy": float(suite_correct.mean()) if suite_correct.size else None,
                      "suite_n": int(suite_correct.size),
                      "profile_rows": len(reference[0]) if reference else len(data.val), "profile_source": profile_source}
    fresh = inputs.fresh
    refinement = {
        "trigger": trigger, "parent": champion.tag, "since_id": since_id, "monitor_runs": monitor_runs or [],
        "fresh_labels": len(fresh), "fresh_train": len(inputs.fresh_train), "gate_items": len(inputs.gate_rows),
        "fresh_by_source": {src: sum(1 for r in fresh if r[3] == src) for src in predlog.SOURCES},
        "fresh_log_ids": [fresh[0][0], fresh[-1][0]], "replay_rows": len(inputs.replay), "self_training_rows": len(inputs.pseudo),
        "refine_config": config.model_dump(mode="json"), "weight_averaging": averaging,
    }
    lineage = build_lineage(cfg, fitted, data, ev, champion.tag, started,
                            extra={"refinement": refinement, "data_lineage": data_lineage, "reference": reference_info,
                                   "suite_accuracy_by_part": part_accuracy})
    outcome = register_fitted(cfg, fitted, data, ev, lineage, reference=reference)
    challenger_tag = outcome.tag
    inference.load_verified(challenger_tag)  # a challenger that does not load from the store fails the refinement here

    if choice.runtime == "torch":
        scorers = {"champion": champ_pred, "challenger": chall_pred}
    else:  # as they serve: the challenger's files are made here, once, for the service to load
        scorers = {"champion": choice.load(champion.tag), "challenger": choice.load(challenger_tag)}
    result, promoted, scored_with = _gate_and_promote(engine, config, inputs, scorers, challenger_tag, trigger, fence)
    summary = {
        "challenger": challenger_tag, "champion": champion.tag, "promoted": promoted, "gate": result.to_json(),
        "gate_scored_with": scored_with,
        "refinement": refinement, "data_lineage": data_lineage, "reference": reference_info,
        "val_metrics": outcome.metrics.get("val"), "seconds": round(time.perf_counter() - started, 1),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    audit.record(engine, "retrain_succeeded", challenger_tag, promoted=promoted, seconds=summary["seconds"],
                 gate_passed=result.passed, reasons=result.reasons, generation=generation)
    return summary
