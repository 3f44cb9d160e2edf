"""Monitor passes, stored in the state DB: one row per pass with its window bounds and results.

The row is the source of truth for the controller's metrics and for the policy; the HTML report
and the Evidently workspace snapshot are for people.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import TYPE_CHECKING

from sqlalchemy import Boolean, Column, Float, Integer, MetaData, String, Table, Text, insert, select, text
from sqlalchemy.engine import Engine

from core.predlog import LogId
from core.statedb import UTCDateTime, create_tables

if TYPE_CHECKING:  # the type only: monitoring.analysis imports Evidently (3.5 s), which readers of stored passes never need
    from monitoring.analysis import PassResult

metadata = MetaData()

monitor_runs = Table(
    "monitor_runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("finished_at", UTCDateTime(), nullable=False),
    Column("model_version", String(255), nullable=False, index=True),
    Column("status", String(32), nullable=False),  # ok | insufficient
    Column("drift", Boolean),  # NULL when there was no verdict
    Column("window_size", Integer, nullable=False),
    Column("window_first_id", LogId),
    Column("window_last_id", LogId),
    Column("window_start", UTCDateTime()),
    Column("window_end", UTCDateTime()),
    Column("labelled", Integer, nullable=False),
    Column("realized_accuracy", Float),
    Column("estimated_accuracy", Float),
    Column("duration_s", Float, nullable=False),
    Column("report_path", Text),
    Column("result", Text, nullable=False),  # PassResult.to_json()
)

# newest-first reads of one model's passes walk this index (one pass a minute is 43,000 rows a month)
INDEX = "CREATE INDEX IF NOT EXISTS ix_monitor_runs_model_id ON monitor_runs (model_version, id)"


_ready: set[str] = set()  # engines whose schema this process has already checked


def ensure_schema(engine: Engine) -> None:
    key = str(engine.url)
    if key in _ready:
        return
    create_tables(metadata, engine)
    with engine.begin() as conn:  # also on a table made before the index (IF NOT EXISTS: a no-op after)
        conn.execute(text(INDEX))
    _ready.add(key)


def prune_before(engine: Engine, cutoff: dt.datetime, batch: int = 1000) -> tuple[int, list[str]]:
    """Delete the passes that finished before `cutoff` (retention.days: core/retention.py), in short
    batches, and return (passes deleted, their report files) for the caller to remove."""
    deleted, reports = 0, []
    while True:
        with engine.begin() as conn:
            rows = conn.execute(select(monitor_runs.c.id, monitor_runs.c.report_path)
                                .where(monitor_runs.c.finished_at < cutoff).order_by(monitor_runs.c.id).limit(batch)).all()
            if not rows:
                return deleted, reports
            conn.execute(monitor_runs.delete().where(monitor_runs.c.id.in_([r.id for r in rows])))
        deleted += len(rows)
        reports += [r.report_path for r in rows if r.report_path]


def _num(value) -> float | None:
    return None if value is None or value != value else float(value)  # NaN → NULL


def save(engine: Engine, result: PassResult) -> int:
    """Store a pass; returns its run id."""
    q = result.quality
    with engine.begin() as conn:
        row = conn.execute(insert(monitor_runs).values(
            finished_at=dt.datetime.now(dt.timezone.utc), model_version=result.model_version, status=result.status,
            drift=result.drift, window_size=result.window_size, window_first_id=result.window_first_id,
            window_last_id=result.window_last_id, window_start=result.window_start, window_end=result.window_end,
            labelled=int(q.get("labelled", 0)), realized_accuracy=_num(q.get("realized_accuracy")),
            estimated_accuracy=_num(q.get("estimated_accuracy")), duration_s=result.duration_s,
            result=json.dumps(result.to_json()),
        ))
        return int(row.inserted_primary_key[0])


def set_report_path(engine: Engine, run_id: int, path: str) -> None:
    with engine.begin() as conn:
        conn.execute(monitor_runs.update().where(monitor_runs.c.id == run_id).values(report_path=path))


def _row_json(row) -> dict:
    out = json.loads(row.result)
    out.update({"run_id": row.id, "finished_at": row.finished_at.isoformat() if row.finished_at else None,
                "report_path": row.report_path})
    return out


def latest(engine: Engine, model_version: str | None = None) -> dict | None:
    """The newest stored pass (of one model version, if given), as JSON."""
    q = select(monitor_runs).order_by(monitor_runs.c.id.desc()).limit(1)
    if model_version:
        q = q.where(monitor_runs.c.model_version == model_version)
    with engine.connect() as conn:
        row = conn.execute(q).first()
    return _row_json(row) if row else None


def recent(engine: Engine, limit: int = 20, model_version: str | None = None) -> list[dict]:
    """The newest passes first."""
    q = select(monitor_runs).order_by(monitor_runs.c.id.desc()).limit(limit)
    if model_version:
        q = q.where(monitor_runs.c.model_version == model_version)
    with engine.connect() as conn:
        return [_row_json(r) for r in conn.execute(q).all()]


def last_verdict(engine: Engine, model_version: str) -> dict | None:
    """The newest pass of this version that gave a verdict (status ok)."""
    q = (select(monitor_runs).where(monitor_runs.c.model_version == model_version, monitor_runs.c.status == "ok")
         .order_by(monitor_runs.c.id.desc()).limit(1))
    with engine.connect() as conn:
        row = conn.execute(q).first()
    return _row_json(row) if row else None


def consecutive_drift(engine: Engine, model_version: str, limit: int = 1000) -> int:
    """How many of this version's newest passes with a verdict drifted in a row."""
    q = (select(monitor_runs.c.drift).where(monitor_runs.c.model_version == model_version, monitor_runs.c.status == "ok")
         .order_by(monitor_runs.c.id.desc()).limit(limit))
    count = 0
    with engine.connect() as conn:
        for (drift,) in conn.execute(q):
            if not drift:
                break
            count += 1
    return count
