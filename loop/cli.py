"""CLI verbs of the acting stage: `controller`, `refine`, `retrain`, `rollback`, `history`, `status`.

Each verb imports the modules that do its work inside its body, so that `driftloop --help` stays
fast: the controller and the refinement import torch, transformers and Evidently (~3 s); even the
refinement's settings and the gate's summary line import scipy.stats (0.44 s, measured with
`python -X importtime`), against 0.3 s for the whole of `driftloop --help`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
from typing import Optional

import typer

from core import alias, audit
from core.clikit import emit_json, machine_output, set_options
from core.errors import DriftloopError
from core.statedb import get_engine
from finetune.config import apply_overrides, build_config, load_yaml
from loop.lease import Fence
from monitoring import store


def load_controller_settings(config: Optional[str], sets: Optional[list[str]], **flags):
    """YAML file (sections monitor, policy, refine), then flags, then --set: one validated config."""
    from loop.controller import ControllerSettings  # noqa: PLC0415 - see the module docstring

    raw = apply_overrides(load_yaml(config), {k: v for k, v in flags.items() if v is not None})
    return build_config(apply_overrides(raw, set_options(sets)), ControllerSettings)


def controller_command(
    port: Optional[int] = typer.Option(None, help="HTTP port for /metrics, /status and /reports (default 3100)."),
    host: Optional[str] = typer.Option(None, help="Interface to bind (default 127.0.0.1)."),
    monitor_interval: Optional[float] = typer.Option(None, help="Seconds between monitor passes (default 60)."),
    window: Optional[int] = typer.Option(None, help="Predictions per monitor window (default 1000)."),
    min_samples: Optional[int] = typer.Option(None, help="No verdict below this many predictions (default 200)."),
    policy: Optional[str] = typer.Option(None, help="drift_and_performance | drift | performance | schedule | manual"),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run/--act", help="Only record what the policy would do."),
    lease_ttl: Optional[float] = typer.Option(None, help="Leader lease TTL in seconds (default 15): a standby takes over within it."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML with sections monitor, policy, refine, retention, lease."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Any key: --set policy.cooldown_s=300 (repeatable)."),
) -> None:
    """Run the controller: monitor passes, the retrain policy, refinements, gate, promotion, rollback."""

    from loop.controller import run  # noqa: PLC0415 - see the module docstring

    settings = load_controller_settings(config, sets, port=port, host=host, monitor_interval_s=monitor_interval,
                                        **{"monitor.window": window, "monitor.min_samples": min_samples,
                                           "policy.mode": policy, "policy.dry_run": dry_run, "lease.ttl_s": lease_ttl})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(settings)


def refine_command(
    trigger: str = typer.Option("manual", help="Why (recorded in the lineage and the audit trail)."),
    since_id: Optional[int] = typer.Option(None, help="Use feedback on predictions from this log id on."),
    monitor_runs: str = typer.Option("none", help="Comma-separated monitor run ids behind the trigger."),
    config_json: Optional[str] = typer.Option(None, help="RefineConfig as JSON (the controller passes its own)."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Any refine key: --set replay_ratio=2 (repeatable)."),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="Promote when the gate passes."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    fence: Optional[str] = typer.Option(None, help="The controller's lease term (JSON), checked when promoting; set by the controller."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Fine-tune the production model on fresh labelled traffic (+ replay), gate it, promote it or not."""
    from loop.refine import run  # noqa: PLC0415 - see the module docstring
    from loop.refine_config import RefineConfig  # noqa: PLC0415 - see the module docstring

    raw = json.loads(config_json) if config_json else {}
    cfg = build_config(apply_overrides(apply_overrides(raw, {"promote": promote}), set_options(sets)), RefineConfig)
    runs = [] if monitor_runs in ("", "none") else [int(x) for x in monitor_runs.split(",")]
    try:
        term = Fence.from_arg(fence) if fence else None
    except (ValueError, KeyError, TypeError):
        raise DriftloopError("--fence must be the controller's lease term as JSON {name, holder, token}") from None
    engine = get_engine()
    try:
        with machine_output(as_json):
            summary = run(engine, cfg, trigger=trigger, since_id=since_id, monitor_runs=runs, quiet=quiet or as_json,
                          fence=term.check if term else None)
    except DriftloopError as err:
        audit.record(engine, "retrain_failed", None, trigger=trigger, error=str(err))
        raise
    if as_json:
        emit_json(summary)
        return
    g = summary["gate"]
    typer.echo(f"challenger {summary['challenger']} (parent {summary['champion']}) in {summary['seconds']}s")
    typer.echo(f"gate: fresh {g['champion_fresh_accuracy']} -> {g['challenger_fresh_accuracy']} on {g['fresh_n']} items "
               f"(McNemar p={g['p_value']}), regression loss {g['regression_loss']} on {g['regression_n']} "
               f"(non-inferiority p={g['regression_p_value']}, margin {g['regression_margin']})")
    typer.echo("promoted" if summary["promoted"] else "not promoted: " + "; ".join(g["reasons"]))


def history_command(
    limit: int = typer.Option(30, min=1, help="Newest events."),
    kind: Optional[list[str]] = typer.Option(None, help="Only these kinds (policy, retrain_started, gate, promotion, rollback ...)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The loop's audit trail: policy decisions, refinements, gate results, promotions, rollbacks."""
    from loop.status_page import event_detail  # noqa: PLC0415 - see the module docstring

    unknown = [k for k in kind or [] if k not in audit.KINDS]
    if unknown:
        raise DriftloopError(f"--kind {unknown[0]!r} is not an event kind; one of {', '.join(audit.KINDS)}")
    events = audit.history(get_engine(), limit=limit, kinds=tuple(kind) if kind else None)
    if as_json:
        emit_json({"events": events})
        return
    for e in events:
        typer.echo(f"{e['at'][:19]}  {e['kind']:<18} {e.get('model_version') or '-':<45} {e.get('action', '')} {event_detail(e)}")


def status_command(as_json: bool = typer.Option(False, "--json")) -> None:
    """Champion, last monitor pass, policy state and any running refinement."""
    engine = get_engine()
    store.ensure_schema(engine)
    prod = alias.current(engine=engine)
    latest = store.latest(engine)
    started, finished = audit.last(engine, "retrain_started"), None
    for kind in ("retrain_succeeded", "retrain_failed"):
        e = audit.last(engine, kind)
        if e and (finished is None or e["id"] > finished["id"]):
            finished = e
    running = bool(started and (finished is None or finished["id"] < started["id"]))
    out = {
        "champion": prod.tag if prod else None, "champion_since": prod.updated_at.isoformat() if prod and getattr(prod, "updated_at", None) else None,
        "last_monitor_pass": {k: latest.get(k) for k in ("run_id", "finished_at", "model_version", "status", "drift", "window_size", "quality")} if latest else None,
        "consecutive_drift": store.consecutive_drift(engine, latest["model_version"]) if latest else 0,
        "last_policy": audit.last(engine, "policy"), "refine_running": running,
        "last_retrain": started, "retrains_last_24h": audit.count_since(engine, "retrain_started", dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=24)),
    }
    if as_json:
        emit_json(out)
        return
    typer.echo(f"champion: {out['champion']}")
    if latest:
        typer.echo(f"last monitor pass: run {latest['run_id']} at {latest['finished_at'][:19]}, {latest['status']}, drift {latest['drift']}, "
                   f"{latest['window_size']} predictions; {out['consecutive_drift']} drifted passes in a row")
    if out["last_policy"]:
        typer.echo(f"last policy decision: {out['last_policy'].get('action')} ({out['last_policy'].get('reason')})")
    typer.echo(f"refinement running: {running}; retrains in the last 24 h: {out['retrains_last_24h']}")


def retrain_command(
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait for the refinement to finish."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Any refine key: --set epochs=1 (repeatable)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Start a refinement by hand (the policy's `manual` mode), recorded in the audit trail."""
    from loop import refine_jobs  # noqa: PLC0415 - see the module docstring
    from loop.refine_config import RefineConfig  # noqa: PLC0415 - see the module docstring

    refine = build_config(set_options(sets), RefineConfig)
    engine = get_engine()
    prod = alias.current(engine=engine)
    if prod is None:
        raise DriftloopError("no production model to refine: train and promote one first")
    audit.record(engine, "policy", prod.tag, action="retrain", reason="manual: driftloop retrain", dry_run=False)
    if not wait:
        subprocess.Popen(refine_jobs.refine_command(refine, "manual", None, []), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        typer.echo("refinement started in the background; follow it with `driftloop history`")
        return
    refine_jobs.RefineJobs().start(engine, refine, "manual", prod.tag, wait=True)
    last = audit.history(engine, limit=5, kinds=("retrain_succeeded", "retrain_failed"))
    outcome = last[0] if last else {}
    if as_json:
        emit_json(outcome)
    else:
        typer.echo(f"{outcome.get('kind')}: {outcome.get('model_version')} promoted={outcome.get('promoted')} {outcome.get('reasons') or ''}")
    if outcome.get("kind") != "retrain_succeeded":
        raise DriftloopError(f"refinement failed: {outcome.get('error') or outcome.get('log') or 'see driftloop history'}")


def rollback_command(
    to: Optional[str] = typer.Option(None, "--to", help="Go to this tag instead of the previous model."),
    reason: Optional[str] = typer.Option(None),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Return production to the model served before the last promotion (recorded in the audit trail)."""
    from core import production  # noqa: PLC0415 - see the module docstring

    engine = get_engine()
    before = alias.current(engine=engine)
    state = production.rollback(to=to, reason=reason or "manual: driftloop rollback", actor="cli", engine=engine)
    if as_json:
        emit_json(state.to_json())
    else:
        typer.echo(f"production -> {state.tag} (rolled back from {before.tag if before else 'none'})")


def register(app: typer.Typer) -> None:
    """Attach this stage's verbs to the `driftloop` CLI."""
    app.command("controller")(controller_command)
    app.command("refine")(refine_command)
    app.command("retrain")(retrain_command)
    app.command("rollback")(rollback_command)
    app.command("history")(history_command)
    app.command("status")(status_command)
