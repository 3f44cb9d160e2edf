"""The label-request queue in the state DB, and the budget's accounting.

One row per logged prediction a person was asked to label (a prediction is asked about at most
once): what kind of request it is (`random`: part of a uniform sample, whose answers may measure
accuracy; `informative`: chosen because the model was unsure, whose answers only train), what it
was for (`confirmation` of a drift, or `training` for a refinement), and where it stands:

    pending ──send──► sent ──answer──► answered          (the label is in the prediction log)
       │                 └──skip────► skipped            (counted, never used)
       └────────────────────────────► expired            (unanswered after labels.request_ttl_h)

The budget counts requests *created*: an expired or skipped request still cost an annotator's
attention, so it is not given back. `create` checks the budget and inserts in one transaction.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, func, select, text, update
from sqlalchemy.engine import Engine

from core import predlog
from core.predlog import LogId
from core.statedb import UTCDateTime, create_tables
from labels.config import LabelsConfig

metadata = MetaData()

requests = Table(
    "label_requests", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("log_id", LogId, nullable=False, index=True),
    Column("request_id", String(64), nullable=False, unique=True),  # the prediction's request id
    Column("model_version", String(255), nullable=False),
    Column("kind", String(16), nullable=False),  # random | informative
    Column("purpose", String(16), nullable=False),  # confirmation | training
    Column("batch", String(32), nullable=False),  # the request batch it was created in
    Column("reason", Text, nullable=False),
    Column("score", Text),  # why this item: JSON (margin, cluster) for informative ones
    Column("created_at", UTCDateTime(), nullable=False, index=True),
    Column("status", String(16), nullable=False, index=True),  # pending | sent | answered | skipped | expired
    Column("sent_at", UTCDateTime()),
    Column("task_id", String(64)),  # the annotation tool's id for it
    Column("answered_at", UTCDateTime()),
    Column("answer", String(255)),
    Column("annotator", String(255)),
)

KINDS = {"random": predlog.REQUESTED_RANDOM, "informative": predlog.REQUESTED_INFORMATIVE}  # kind -> label source
OPEN = ("pending", "sent")
STATUSES = ("pending", "sent", "answered", "skipped", "expired")


def ensure_schema(engine: Engine) -> None:
    create_tables(metadata, engine)


@dataclass(frozen=True)
class Candidate:
    """A logged prediction to ask about."""

    log_id: int
    request_id: str
    score: str | None = None


@dataclass
class Created:
    batch: str
    created: int
    asked: int
    refused_by_budget: int
    already_asked: int

    def to_json(self) -> dict:
        return self.__dict__.copy()


def used_today(conn, now: dt.datetime) -> int:
    return int(conn.execute(select(func.count()).select_from(requests)
                            .where(requests.c.created_at > now - dt.timedelta(hours=24))).scalar_one())


def used_for_training(conn, since: dt.datetime | None) -> int:
    q = select(func.count()).select_from(requests).where(requests.c.purpose == "training")
    if since is not None:
        q = q.where(requests.c.created_at > since)
    return int(conn.execute(q).scalar_one())


def create(engine: Engine, candidates: Sequence[Candidate], *, model_version: str, kind: str, purpose: str, reason: str,
           config: LabelsConfig, training_since: dt.datetime | None = None, now: dt.datetime | None = None,
           batch: str | None = None) -> Created:
    """Queue requests for `candidates` (in order), as many as the budget allows: at most `per_day`
    created in the last 24 hours, and for training at most `per_refinement` since `training_since`
    (the last refinement's start). One transaction: the budget is read and spent together."""
    if kind not in KINDS or purpose not in ("confirmation", "training"):
        raise ValueError(f"unknown request kind {kind!r} or purpose {purpose!r}")
    now = now or dt.datetime.now(dt.timezone.utc)
    batch = batch or uuid.uuid4().hex
    ensure_schema(engine)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # one budget: concurrent creators queue here
            conn.execute(text("SELECT pg_advisory_xact_lock(7461626c)"))
        else:  # take SQLite's write lock before reading the budget
            conn.execute(update(requests).where(requests.c.id == -1).values(status="pending"))
        left = config.per_day - used_today(conn, now)
        if purpose == "training":
            left = min(left, config.per_refinement - used_for_training(conn, training_since))
        asked_before = set(conn.execute(select(requests.c.request_id).where(
            requests.c.request_id.in_([c.request_id for c in candidates]))).scalars()) if candidates else set()
        fresh = [c for c in candidates if c.request_id not in asked_before]
        take = fresh[:max(0, left)]
        if take:
            conn.execute(requests.insert(), [{
                "log_id": c.log_id, "request_id": c.request_id, "model_version": model_version, "kind": kind,
                "purpose": purpose, "batch": batch, "reason": reason, "score": c.score, "created_at": now, "status": "pending",
            } for c in take])
    return Created(batch, len(take), len(candidates), len(fresh) - len(take), len(candidates) - len(fresh))


def asked_since(engine: Engine, model_version: str, first_log_id: int) -> set[str]:
    """Request ids of `model_version`'s predictions from log id `first_log_id` on that were already asked about."""
    ensure_schema(engine)
    with engine.connect() as conn:
        return set(conn.execute(select(requests.c.request_id).where(requests.c.model_version == model_version,
                                                                    requests.c.log_id >= first_log_id)).scalars())


def answered_requests(engine: Engine, model_version: str) -> int:
    """Requests of this model (any purpose) answered so far: the labels in hand that were asked for."""
    ensure_schema(engine)
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(requests).where(
            requests.c.model_version == model_version, requests.c.status == "answered")).scalar_one())


def open_requests(engine: Engine, model_version: str, purpose: str) -> int:
    """Requests of this model and purpose still waiting for an answer."""
    ensure_schema(engine)
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(requests).where(
            requests.c.model_version == model_version, requests.c.purpose == purpose,
            requests.c.status.in_(OPEN))).scalar_one())


def pending(engine: Engine, limit: int = 500) -> list[dict]:
    """Requests not yet sent to the annotation tool, oldest first, with what a task shows."""
    ensure_schema(engine)
    c, p = requests.c, predlog.predictions.c
    q = (select(c.id, c.request_id, c.model_version, c.kind, c.purpose, c.batch, predlog.TEXT.label("text"), p.label, p.confidence,
                p.probs)
         .select_from(requests).join(predlog.LOGGED, p.id == c.log_id)
         .where(c.status == "pending").order_by(c.id).limit(limit))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(q)]


def mark_sent(engine: Engine, sent: dict[int, str | None], now: dt.datetime | None = None) -> None:
    """Requests handed to the tool (request row id → the tool's task id)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    with engine.begin() as conn:
        for rid, task in sent.items():
            conn.execute(update(requests).where(requests.c.id == rid, requests.c.status == "pending")
                         .values(status="sent", sent_at=now, task_id=None if task is None else str(task)))


def sent_tasks(engine: Engine, late_days: float = 7.0) -> dict[str, list[int]]:
    """Task ids in the annotation tool of requests sent and not answered yet (by model version),
    and of those that expired in the last `late_days` (a late answer still counts), for polling:
    bounded by the budget, not by months of history."""
    ensure_schema(engine)
    c = requests.c
    recent = c.created_at > dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=late_days)
    out: dict[str, list[int]] = {}
    with engine.connect() as conn:
        for version, task in conn.execute(select(c.model_version, c.task_id).where(
                (c.status == "sent") | ((c.status == "expired") & recent), c.task_id.is_not(None),
                c.task_id.not_like("export:%")).order_by(c.id)):
            if str(task).isdigit():
                out.setdefault(version, []).append(int(task))
    return out


def lookup(engine: Engine, request_id: str) -> dict | None:
    ensure_schema(engine)
    with engine.connect() as conn:
        row = conn.execute(select(requests).where(requests.c.request_id == request_id)).first()
    return dict(row._mapping) if row else None


def close(engine: Engine, request_id: str, status: str, answer: str | None, annotator: str | None,
          now: dt.datetime | None = None) -> None:
    """Record an answer (`answered`) or a skip (`skipped`); a later answer replaces an earlier one."""
    now = now or dt.datetime.now(dt.timezone.utc)
    with engine.begin() as conn:
        conn.execute(update(requests).where(requests.c.request_id == request_id)
                     .values(status=status, answered_at=now, answer=answer, annotator=annotator))


def expire(engine: Engine, config: LabelsConfig, now: dt.datetime | None = None) -> int:
    """Open requests older than the TTL become `expired` (a late answer still counts: see answers.py)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ensure_schema(engine)
    with engine.begin() as conn:
        result = conn.execute(update(requests).where(requests.c.status.in_(OPEN),
                                                     requests.c.created_at < now - dt.timedelta(hours=config.request_ttl_h))
                              .values(status="expired"))
    return int(result.rowcount or 0)


def summary(engine: Engine, config: LabelsConfig, now: dt.datetime | None = None) -> dict:
    """What was asked, answered, skipped, expired and is pending, and what is left of the budget."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ensure_schema(engine)
    c = requests.c
    with engine.connect() as conn:
        counts = {(k, s): int(n) for k, s, n in conn.execute(select(c.kind, c.status, func.count()).group_by(c.kind, c.status))}
        today = used_today(conn, now)
    by_status = {s: sum(n for (_, st), n in counts.items() if st == s) for s in STATUSES}
    return {
        "asked": sum(counts.values()), **by_status,
        "by_kind": {k: {s: counts.get((k, s), 0) for s in STATUSES} for k in KINDS},
        "asked_last_24h": today, "budget_per_day": config.per_day, "budget_left_today": max(0, config.per_day - today),
        "budget_per_refinement": config.per_refinement,
    }
