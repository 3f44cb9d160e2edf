"""The loop's audit trail: every decision, job and model move, in the state DB.

`driftloop history` prints it; the controller's status and metrics read it. One row per event:
policy evaluated (with its signals), skipped and why, refinement started/finished/failed, gate
result, promotion, rollback.
"""

from __future__ import annotations

import datetime as dt
import json

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, func, insert, select
from sqlalchemy.engine import Connection, Engine

from finetune.statedb import UTCDateTime, create_tables

metadata = MetaData()

events = Table(
    "loop_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False, index=True),
    Column("kind", String(64), nullable=False, index=True),
    Column("model_version", String(255)),
    Column("details", Text, nullable=False),
)

KINDS = ("policy", "retrain_started", "retrain_succeeded", "retrain_failed", "gate", "promotion", "rollback", "bake_passed")


def ensure_schema(engine: Engine) -> None:
    create_tables(metadata, engine)


def record_in(conn: Connection, kind: str, model_version: str | None = None, **details) -> int:
    """Write one event inside the caller's transaction (a production move writes it with the pointer)."""
    if kind not in KINDS:
        raise ValueError(f"unknown audit event kind {kind!r}; one of {', '.join(KINDS)}")
    row = conn.execute(insert(events).values(at=dt.datetime.now(dt.timezone.utc), kind=kind, model_version=model_version,
                                             details=json.dumps(details, default=str)))
    return int(row.inserted_primary_key[0])


def record(engine: Engine, kind: str, model_version: str | None = None, **details) -> int:
    ensure_schema(engine)
    with engine.begin() as conn:
        return record_in(conn, kind, model_version, **details)


def _json(row) -> dict:
    return {"id": row.id, "at": row.at.isoformat(), "kind": row.kind, "model_version": row.model_version,
            **json.loads(row.details)}


def history(engine: Engine, limit: int = 50, kinds: tuple[str, ...] | None = None) -> list[dict]:
    """Newest events first."""
    ensure_schema(engine)
    q = select(events).order_by(events.c.id.desc()).limit(limit)
    if kinds:
        q = q.where(events.c.kind.in_(kinds))
    with engine.connect() as conn:
        return [_json(r) for r in conn.execute(q).all()]


def last(engine: Engine, kind: str) -> dict | None:
    rows = history(engine, limit=1, kinds=(kind,))
    return rows[0] if rows else None


def count_since(engine: Engine, kind: str, since: dt.datetime) -> int:
    ensure_schema(engine)
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events).where(events.c.kind == kind, events.c.at >= since)).scalar_one())
