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
    window: Optional[int] = typer.Option(None, min=10, help="Last N predictions (default 1000)."),
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


def controller_command(
    port: int = typer.Option(3100, help="HTTP port for /metrics, /status and /reports."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    monitor_interval: float = typer.Option(60.0, help="Seconds between monitor passes."),
    window: int = typer.Option(1000, min=10, help="Predictions per monitor window."),
    min_samples: int = typer.Option(200, min=10, help="No verdict below this many predictions."),
) -> None:
    """Run the controller: scheduled monitor passes (APScheduler, jobs in the state DB) and their metrics."""
    import logging  # noqa: PLC0415

    from pydantic import ValidationError  # noqa: PLC0415

    from monitoring.config import MonitorConfig  # noqa: PLC0415
    from monitoring.controller import ControllerSettings, run  # noqa: PLC0415

    try:
        settings = ControllerSettings(host=host, port=port, monitor_interval_s=monitor_interval,
                                      monitor=MonitorConfig(window=window, min_samples=min_samples))
    except ValidationError as err:
        first = err.errors()[0]
        raise DriftloopError(f"--{'-'.join(str(x) for x in first['loc']).replace('_', '-')}: {first['msg']}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(settings)


def register(app: typer.Typer) -> None:
    app.command("monitor")(monitor_command)
    app.command("controller")(controller_command)
