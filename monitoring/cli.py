"""CLI verb of the observing stage: `monitor`.

The verb imports the monitor (Evidently, torch: ~3 s) inside its body so that `driftloop --help`
stays fast (see finetune/cli.py).
"""

from __future__ import annotations

import time
from typing import Optional

import typer
from pydantic import ValidationError

from core.clikit import emit_json, machine_output
from core.errors import DriftloopError
from core.statedb import get_engine
from monitoring.config import MonitorConfig


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
    from monitoring.passes import monitor_once  # noqa: PLC0415 - see the module docstring

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


def register(app: typer.Typer) -> None:
    """Attach this stage's verb to the `driftloop` CLI."""
    app.command("monitor")(monitor_command)
