"""`driftloop labels`: the label-request queue by hand: where it stands, export and import.

`status` shows what was asked, answered, skipped, expired and is pending, and the budget left;
`export` writes pending requests for another annotation tool (CSV or JSONL) and marks them sent;
`import` reads answers back through the same path as `/feedback` and Label Studio's answers.
The controller asks and sends on its own (loop/ask.py, labels/studio.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from core.clikit import emit_json
from core.statedb import get_engine

labels_app = typer.Typer(help="Label requests: status, export for another tool, import answers.", no_args_is_help=True)


@labels_app.command("status")
def status_command(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """What was asked, answered, skipped, expired and is pending; the budget left today."""
    from labels import requests  # noqa: PLC0415
    from labels.config import LabelsConfig  # noqa: PLC0415

    summary = requests.summary(get_engine(), LabelsConfig())
    if json_out:
        emit_json(summary)
        return
    typer.echo(f"asked {summary['asked']}: {summary['answered']} answered, {summary['skipped']} skipped, "
               f"{summary['expired']} expired, {summary['pending'] + summary['sent']} waiting "
               f"({summary['pending']} not yet sent)")
    for kind, counts in summary["by_kind"].items():
        typer.echo(f"  {kind:<12} " + ", ".join(f"{n} {status}" for status, n in counts.items()))
    typer.echo(f"budget: {summary['asked_last_24h']} asked in the last 24 h of {summary['budget_per_day']} a day "
               f"({summary['budget_left_today']} left); {summary['budget_per_refinement']} per refinement")


@labels_app.command("export")
def export_command(
    out: Path = typer.Argument(..., help="File to write (.csv or .jsonl)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv or jsonl (default: from the file name)."),
    limit: int = typer.Option(10_000, min=1, help="At most this many requests."),
) -> None:
    """Write the pending label requests for another annotation tool, and mark them sent."""
    from labels import transfer  # noqa: PLC0415

    n = transfer.export(get_engine(), out, fmt, limit)
    typer.echo(f"exported {n} pending requests to {out}")


@labels_app.command("import")
def import_command(
    path: Path = typer.Argument(..., help="Answers (.csv or .jsonl): request_id, label (empty: skipped), annotator."),
    fmt: Optional[str] = typer.Option(None, "--format", help="csv or jsonl (default: from the file name)."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Record answers to label requests through the /feedback path (idempotent; a changed answer replaces)."""
    from labels import answers, transfer  # noqa: PLC0415

    applied = answers.apply(get_engine(), transfer.read_answers(path, fmt))
    if json_out:
        emit_json(applied.to_json())
        return
    typer.echo(f"recorded {applied.recorded}, replaced {applied.replaced}, unchanged {applied.unchanged}, "
               f"skipped {applied.skipped}, refused {len(applied.refused)}")
    for line in applied.refused:
        typer.echo(f"  refused {line}")


def register(app: typer.Typer) -> None:
    app.add_typer(labels_app, name="labels")
