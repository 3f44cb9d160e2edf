"""`driftloop log`: the prediction log's size, retention and erasure, by hand.

The leading controller runs retention on schedule (loop/upkeep.py); these verbs are for an operator:
`status` (how big and how old the log is, what retention has still to do, which holds keep rows
whole), `compact` (one retention run now, e.g. before a disk fills), `vacuum` (SQLite: the one-time
rewrite that gives an older log incremental auto-vacuum) and `forget` (erase one customer's texts
on request, core/forget.py). Each opens the state DB the service and the controller use
(DRIFTLOOP_DB_URL or the home's SQLite file). Imports beyond SQLAlchemy and pydantic go inside the
verbs, as in the other CLI modules (driftloop/cli.py says why).
"""

from __future__ import annotations

import datetime as dt
from typing import Optional

import typer

from core.clikit import emit_json, machine_output
from core.errors import DriftloopError
from core.statedb import get_engine

log_app = typer.Typer(help="The prediction log: size and age, retention, vacuum, forget on request.", no_args_is_help=True)

RAW_DAYS_HELP = "Days a row keeps its text and embedding (default 7)."
DAYS_HELP = "Days a row is kept at all (default 90)."


def retention_config(raw_days: Optional[float], days: Optional[float]):
    """A RetentionConfig from the flags (defaults for the ones not given), or one line saying what is wrong."""
    from core.retention import RetentionConfig  # noqa: PLC0415 - imports numpy through the log's module

    for flag, value in (("--raw-days", raw_days), ("--days", days)):
        if value is not None and not value > 0:  # also NaN
            raise DriftloopError(f"{flag} must be a positive number of days, got {value:g}")
    defaults = RetentionConfig()
    raw = defaults.raw_days if raw_days is None else raw_days
    keep = defaults.days if days is None else days
    if raw > keep:
        raise DriftloopError(f"--raw-days {raw:g} > --days {keep:g}: a row cannot keep its text longer than the row itself")
    return RetentionConfig(raw_days=raw, days=keep)


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _age(iso: Optional[str], now: dt.datetime) -> str:
    if iso is None:
        return "none"
    at = dt.datetime.fromisoformat(iso)
    at = at if at.tzinfo else at.replace(tzinfo=dt.timezone.utc)
    return f"{iso[:19]} ({(now - at).total_seconds() / 86400:.1f} days ago)"


@log_app.command("status")
def status_command(
    raw_days: Optional[float] = typer.Option(None, help=RAW_DAYS_HELP + " Counts the rows pending compaction."),
    days: Optional[float] = typer.Option(None, help=DAYS_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The log's size and age: rows, bytes, oldest rows, pending compaction, disk free, holds."""
    from core import predlog, retention  # noqa: PLC0415 - see the module docstring

    config = retention_config(raw_days, days)
    engine = get_engine()
    predlog.ensure_schema(engine)
    now = dt.datetime.now(dt.timezone.utc)
    stats = retention.stats(engine, config, now=now)
    holds = [{"model_version": h.model_version, "from_id": h.from_id, "reason": h.reason} for h in retention.active_holds(engine, now)]
    out = {**stats, "engine": engine.dialect.name, "holds": holds}
    if as_json:
        emit_json(out)
        return
    disk = (f"; disk free {_bytes(stats['disk_free_bytes'])} of {_bytes(stats['disk_total_bytes'])}"
            if stats["disk_free_bytes"] is not None else "")
    counted = "estimated" if engine.dialect.name == "postgresql" else "id span"
    typer.echo(f"log ({engine.dialect.name}): {stats['rows']:,} rows ({counted}), {_bytes(stats['bytes'])} on disk{disk}")
    typer.echo(f"oldest row: {_age(stats['oldest_at'], now)}; oldest with text or embedding: {_age(stats['oldest_raw_at'], now)}")
    typer.echo(f"retention: text and embeddings for {config.raw_days:g} days, rows for {config.days:g} days; "
               f"{stats['pending_compaction']:,} rows pending compaction")
    typer.echo("holds: none" if not holds else f"holds ({len(holds)}):")
    for h in holds:
        typer.echo(f"  {h['model_version']} from log id {h['from_id']}: {h['reason']}")


@log_app.command("compact")
def compact_command(
    raw_days: Optional[float] = typer.Option(None, help=RAW_DAYS_HELP),
    days: Optional[float] = typer.Option(None, help=DAYS_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """One retention run now (what the controller runs on schedule).

    Deletes rows older than --days, drops text and embedding from rows older than --raw-days (rows
    under a hold stay whole), prunes old monitor passes and reports, then gives freed space back
    (SQLite). It works in short batches: the service keeps answering meanwhile."""
    config = retention_config(raw_days, days)  # before the import below: a typo costs no 5 s wait
    from loop.upkeep import run_retention  # noqa: PLC0415 - torch and transformers, through loop.bake (~5 s)

    engine = get_engine()
    with machine_output(as_json):
        summary = run_retention(engine, config)
    if as_json:
        emit_json(summary)
        return
    typer.echo(f"compacted {summary['compacted']:,} rows (text and embedding dropped: older than {config.raw_days:g} days), "
               f"deleted {summary['deleted']:,} (older than {config.days:g} days), "
               f"{len(summary['partitions_dropped'])} partitions dropped, {summary['vacuumed_pages']:,} pages returned, "
               f"{summary['monitor_passes_deleted']} monitor passes and {summary['reports_deleted']} reports deleted "
               f"in {summary['seconds']}s")
    for line in summary["kept"]:
        typer.echo(f"kept: {line}")
    if not summary["finished"]:
        typer.echo(f"stopped after max_run_s ({config.max_run_s:g}s) with work left: run it again")


@log_app.command("vacuum")
def vacuum_command(as_json: bool = typer.Option(False, "--json")) -> None:
    """SQLite only: rewrite the log's file once (locks the log: the service answers 503).

    VACUUM switches an older log to incremental auto-vacuum, so that retention returns freed space
    to the file system from then on. WARNING: it holds the log's write lock throughout, so the
    service answers 503 meanwhile (stop traffic first), and it needs free disk space of the file's
    size."""
    from core import retention  # noqa: PLC0415 - see the module docstring

    engine = get_engine()
    if engine.dialect.name != "sqlite":
        raise DriftloopError(f"log vacuum is for SQLite; on {engine.dialect.name} autovacuum and dropped day partitions return space")
    size, disk = retention.file_bytes(engine), retention.disk_usage(engine)
    if size is not None and disk is not None and disk[0] < size:
        raise DriftloopError(f"VACUUM needs {_bytes(size)} free beside the log (its size), only {_bytes(disk[0])} is free")
    result = retention.full_vacuum(engine)
    if as_json:
        emit_json(result)
        return
    typer.echo(f"vacuumed: {_bytes(result['bytes_before'])} -> {_bytes(result['bytes_after'])} in {result['seconds']}s; "
               "incremental auto-vacuum is on")


@log_app.command("forget")
def forget_command(
    request_id: Optional[list[str]] = typer.Option(None, "--request-id", help="A prediction's request id (repeatable)."),
    text_sha256: Optional[list[str]] = typer.Option(None, "--text-sha256", help=(
        "sha256 (hex) of a text's utf-8 bytes: every logged row with it, any model (repeatable). Reads the whole "
        "log once (the hash has no index), without blocking the service.")),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Erase a customer's texts on request (GDPR art. 17).

    Deletes their rows from the prediction log, and the dataset files holding their texts that no
    served model needs. Prints one line for each copy it could not delete and why (a dataset a
    served model's lineage needs, a model's reference profile), and ends with complete or
    INCOMPLETE (--json: "complete")."""
    from core import forget  # noqa: PLC0415 - see the module docstring

    selection = forget.parse_selection(request_id, text_sha256)
    engine = get_engine()
    with machine_output(as_json):
        result = forget.forget(engine, selection)
    if as_json:
        emit_json(result.to_json())
        return
    deleted = [d for d in result.datasets if d.deleted]
    typer.echo(f"deleted {result.rows_deleted} rows from the prediction log and {len(deleted)} dataset files; "
               f"looked for {len(result.text_hashes)} texts")
    for line in result.notes:
        typer.echo(f"note: {line}")
    for line in result.not_done:
        typer.echo(f"not deleted: {line}")
    typer.echo("complete: no copy driftloop knows of is left" if result.complete
               else "INCOMPLETE: copies remain (see the lines above)")


def register(app: typer.Typer) -> None:
    """Attach `driftloop log` to the `driftloop` CLI."""
    app.add_typer(log_app, name="log")
