"""The loop's audit trail: every decision, job and model move, in the state DB.

`driftloop history` prints it; the controller's status and metrics read it. One row per event:
policy evaluated (with its signals), skipped and why, refinement started/finished/failed, gate
result, promotion, rollback.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Literal, TypedDict, get_args

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, func, insert, select
from sqlalchemy.engine import Connection, Engine

from core.statedb import UTCDateTime, create_tables

metadata = MetaData()

events = Table(
    "loop_events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime(), nullable=False, index=True),
    Column("kind", String(64), nullable=False, index=True),
    Column("model_version", String(255)),
    Column("details", Text, nullable=False),
)

Kind = Literal["policy", "retrain_started", "retrain_succeeded", "retrain_failed", "gate", "promotion", "rollback", "bake_passed",
               "log_forget"]
KINDS: tuple[str, ...] = get_args(Kind)


class AuditEvent(TypedDict, total=False):
    """One event as `history` returns it: these keys always, plus the details its kind records
    (e.g. a gate event carries `GateResult.to_json()`, a promotion `previous` and `reason`)."""

    id: int
    at: str  # ISO 8601, UTC
    kind: Kind
    model_version: str | None


def _checked(kind: str) -> Kind:
    if kind not in KINDS:
        raise ValueError(f"unknown audit event kind {kind!r}; one of {', '.join(KINDS)}")
    return kind  # type: ignore[return-value]


def ensure_schema(engine: Engine) -> None:
    create_tables(metadata, engine)


def record_in(conn: Connection, kind: Kind, model_version: str | None = None, **details) -> int:
    """Write one event inside the caller's transaction (a production move writes it with the pointer)."""
    _checked(kind)
    row = conn.execute(insert(events).values(at=dt.datetime.now(dt.timezone.utc), kind=kind, model_version=model_version,
                                             details=json.dumps(details, default=str)))
    return int(row.inserted_primary_key[0])


def record(engine: Engine, kind: Kind, model_version: str | None = None, **details) -> int:
    ensure_schema(engine)
    with engine.begin() as conn:
        return record_in(conn, kind, model_version, **details)


def _json(row) -> AuditEvent:
    return {"id": row.id, "at": row.at.isoformat(), "kind": row.kind, "model_version": row.model_version,
            **json.loads(row.details)}


def history(engine: Engine, limit: int = 50, kinds: tuple[Kind, ...] | None = None) -> list[AuditEvent]:
    """Newest events first (only of `kinds`, when given: each one checked)."""
    ensure_schema(engine)
    q = select(events).order_by(events.c.id.desc()).limit(limit)
    if kinds:
        q = q.where(events.c.kind.in_([_checked(k) for k in kinds]))
    with engine.connect() as conn:
        return [_json(r) for r in conn.execute(q).all()]


def last(engine: Engine, kind: Kind) -> AuditEvent | None:
    rows = history(engine, limit=1, kinds=(kind,))
    return rows[0] if rows else None


def count_since(engine: Engine, kind: Kind, since: dt.datetime) -> int:
    _checked(kind)
    ensure_schema(engine)
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(events).where(events.c.kind == kind, events.c.at >= since)).scalar_one())
