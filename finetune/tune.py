"""`driftloop tune`: random or grid search over a declared space; the best trial is registered.

The space is a YAML mapping of dotted config keys to either a list of values or a distribution:
``{loguniform: [1e-5, 3e-4]}``, ``{uniform: [0.0, 0.3]}``, ``{int: [1, 4]}`` (random search only).
Every trial's config and metrics are recorded in the state DB (table ``tune_trials``).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import math
import random
import sys
import time
import uuid
from typing import Any

from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, insert

from core.errors import DriftloopError
from core.statedb import UTCDateTime, create_tables, get_engine
from finetune.config import TrainConfig, apply_overrides, build_config
from finetune.pipeline import build_lineage, evaluate, load_data, register_fitted
from finetune.training import fit

metadata = MetaData()
tune_trials = Table(
    "tune_trials", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("study", String(64), nullable=False, index=True),
    Column("trial", Integer, nullable=False),
    Column("params", Text, nullable=False),
    Column("config", Text, nullable=False),
    Column("metrics", Text),
    Column("objective", Float),
    Column("status", String(16), nullable=False),
    Column("error", Text),
    Column("seconds", Float),
    Column("at", UTCDateTime(), nullable=False),
)

DISTRIBUTIONS = ("loguniform", "uniform", "int")


def _check_space(space: Any, method: str) -> dict[str, Any]:
    if not isinstance(space, dict) or not space:
        raise DriftloopError("search space must be a non-empty mapping of config keys to values or distributions")
    for key, spec in space.items():
        if isinstance(spec, list):
            if not spec:
                raise DriftloopError(f"search space {key}: empty list")
            continue
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS:
            lo_hi = next(iter(spec.values()))
            if method == "grid":
                raise DriftloopError(f"search space {key}: grid search needs a list of values, not a distribution")
            if not (isinstance(lo_hi, list) and len(lo_hi) == 2 and all(isinstance(v, (int, float)) for v in lo_hi) and lo_hi[0] < lo_hi[1]):
                raise DriftloopError(f"search space {key}: a distribution takes [low, high] with low < high")
            if next(iter(spec)) == "loguniform" and lo_hi[0] <= 0:
                raise DriftloopError(f"search space {key}: loguniform needs low > 0")
            continue
        raise DriftloopError(f"search space {key}: expected a list or one of {', '.join(DISTRIBUTIONS)}")
    return space


def _sample(spec: Any, rng: random.Random) -> Any:
    if isinstance(spec, list):
        return rng.choice(spec)
    kind, (lo, hi) = next(iter(spec.items()))
    if kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if kind == "uniform":
        return rng.uniform(lo, hi)
    return rng.randint(int(lo), int(hi))


def trial_params(space: dict[str, Any], method: str, trials: int, seed: int) -> list[dict[str, Any]]:
    """The parameter sets to try, in order."""
    space = _check_space(space, method)
    if method == "grid":
        keys = list(space)
        combos = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
        return combos[:trials] if trials else combos
    rng = random.Random(seed)
    return [{k: _sample(v, rng) for k, v in space.items()} for _ in range(trials)]


def tune(config: TrainConfig, space: dict[str, Any], *, method: str = "random", trials: int = 8,
         metric: str = "f1_macro", register: bool = True, quiet: bool = False) -> dict:
    """Run the search; returns the study summary (and the registered tag of the best trial)."""
    params_list = trial_params(space, method, trials, config.training.seed)
    base = config.model_dump(mode="json")
    configs = [build_config(apply_overrides(base, params)) for params in params_list]  # validate all up front
    engine = get_engine()
    create_tables(metadata, engine)
    study = uuid.uuid4().hex[:12]
    started = time.perf_counter()
    data = load_data(config)
    best = None
    results = []
    for i, (params, cfg) in enumerate(zip(params_list, configs), start=1):
        t0 = time.perf_counter()
        row = {"study": study, "trial": i, "params": json.dumps(params), "config": json.dumps(cfg.model_dump(mode="json")),
               "at": dt.datetime.now(dt.timezone.utc)}
        try:
            fitted = fit(cfg, data, quiet=True, progress=False)
            ev = evaluate(cfg, fitted, data)
        except DriftloopError as err:
            row.update(status="failed", error=str(err), seconds=time.perf_counter() - t0)
            with engine.begin() as conn:
                conn.execute(insert(tune_trials).values(**row))
            results.append({"trial": i, "params": params, "status": "failed", "error": str(err)})
            continue
        objective = ev.metrics["val"][metric]
        row.update(status="ok", metrics=json.dumps(ev.metrics), objective=objective, seconds=time.perf_counter() - t0)
        with engine.begin() as conn:
            conn.execute(insert(tune_trials).values(**row))
        results.append({"trial": i, "params": params, "status": "ok", "objective": objective,
                        "val_accuracy": ev.metrics["val"]["accuracy"], "seconds": round(row["seconds"], 2)})
        if not quiet:
            shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
            print(f"trial {i}/{len(params_list)}  val {metric} {objective:.4f}  [{shown}]  ({row['seconds']:.1f}s)", file=sys.stderr, flush=True)
        if best is None or objective > best[0]:
            best = (objective, i, params, cfg, fitted, ev)
        else:
            del fitted
    if best is None:
        raise DriftloopError(f"all {len(params_list)} trials failed; first error: {results[0].get('error')}")
    objective, idx, params, cfg, fitted, ev = best
    summary = {"study": study, "method": method, "metric": f"val.{metric}", "trials": results,
               "best": {"trial": idx, "params": params, "objective": objective}}
    if register:
        tuning = {"study": study, "trial": idx, "params": params, "trials": len(params_list), "metric": f"val.{metric}"}
        lineage = build_lineage(cfg, fitted, data, ev, cfg.registry.parent, started, extra={"tuning": tuning})
        outcome = register_fitted(cfg, fitted, data, ev, lineage, promote_reason=f"best of tuning study {study}")
        summary["model"] = outcome.tag
        summary["metrics"] = outcome.metrics
        summary["promoted"] = outcome.promoted
        summary["report"] = outcome.report_path
    return summary
