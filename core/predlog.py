"""The prediction log: one row per prediction, written by the service, read by the monitor and the loop.

This module is the log's only door: the schema, the writes (the service's batches, /feedback) and
every query the other stages make (a monitor window, the loop's label counts, a refinement's fresh
rows, a bake's paired items). A change of schema or index is made and reviewed in one place.

Rows are written per batch in one transaction, and the service answers only after the commit, so
an acknowledged prediction survives a kill -9 of any process (SQLite WAL; an fsync per commit, which
also survives power loss, with DRIFTLOOP_DB_SYNCHRONOUS=full: core/statedb.py; or Postgres). Feedback
(late ground truth) is joined onto the same row by request id.

The log grows by millions of rows a day under real load, so every query here touches O(window)
rows, never O(log) (docs/benchmarks.md, bench/logscale.py; tests/test_log_plans.py checks each plan
with EXPLAIN on both engines):

- newest-first reads of one model walk `ix_predictions_model_id (model_version, id)` backwards and
  stop at their LIMIT (the old `(model_version, created_at)` index made SQLite read and sort every
  row the model ever served: 10.2 s for a 1,000-row window at 1 M rows);
- labelled-row reads walk the partial indexes `ix_predictions_labelled` (by id) and
  `ix_predictions_labelled_at` (by label time), which hold only rows with feedback;
- a time bound (`since`, a promotion's time) becomes an id bound first (`first_id_at`: one probe of
  `ix_predictions_created`), so it narrows the id range instead of filtering a scan;
- counts that only feed a threshold are capped (`cap`): they stop once the answer is known.

The customer's text and the embedding (~1.9 of a row's ~2.2 KB) live in a side table,
`prediction_raw`, keyed by the row's id: retention deletes them after `raw_days` and so frees their
pages (SQLite) or drops their day (Postgres). Measured first with both in the row: compaction set
them to NULL, which freed no disk on either engine (SQLite does not merge shrunken pages; Postgres
keeps the old row versions until the day is dropped), so disk grew with `days`, not `raw_days`.
Reads join the side table by primary key (one probe per row read) and take `TEXT` and `EMBEDDING`,
which also see what a log made before the side table keeps in the row's own columns.

On Postgres both tables are partitioned by day on `created_at` (core/partitions.py; retention drops
whole days); a partitioned table's unique keys must hold the partition key, so there the primary
keys are `(id, created_at)` and `request_id` has a plain index (ids are uuid4 hex made by the
service). An existing unpartitioned Postgres log keeps working as it is (retention then deletes in
batches).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    Row,
    String,
    Table,
    Text,
    and_,
    case,
    func,
    inspect,
    or_,
    select,
    text as sql_text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError, ProgrammingError

from core.descriptors import DESCRIPTOR_COLUMNS
from core.statedb import UTCDateTime, create_tables

metadata = MetaData()

# 64-bit ids on Postgres (100 predictions/s pass 2^31 in 8 months); SQLite's INTEGER PRIMARY KEY is 64-bit already
LogId = BigInteger().with_variant(Integer, "sqlite")

predictions = Table(
    "predictions", metadata,
    Column("id", LogId, primary_key=True, autoincrement=True),
    Column("request_id", String(32), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("model_version", String(255), nullable=False),
    Column("text", Text),  # legacy: logs made before `prediction_raw` kept the text here (NULL in new rows)
    Column("text_sha256", String(64), nullable=False),
    Column("label", String(255), nullable=False),
    Column("confidence", Float, nullable=False),
    Column("probs", Text, nullable=False),  # JSON {label: calibrated probability}
    *(Column(name, Float, nullable=False) for name in DESCRIPTOR_COLUMNS),
    Column("truncated", Boolean, nullable=False),
    Column("embedding", LargeBinary),  # legacy, as `text` (new rows: prediction_raw.embedding)
    Column("feedback_label", String(255)),
    Column("feedback_at", UTCDateTime()),
    Column("runtime", String(32)),  # what computed the row (core/runtimes.py); NULL: logged before this column, read as torch
                                    # (torch or onnx then, whose outputs match torch's within 1e-4)
    Column("feedback_source", String(32)),  # how the label came: one of SOURCES; NULL: organic (before this column)
    Column("feedback_annotator", String(255)),  # who gave it, when the annotation tool says so
)

# Where a label comes from. Labels a person was *asked* for because the model was unsure of them are
# not a sample of the traffic: accuracy measured on them is biased (Farquhar et al., ICLR 2021), so
# they train and nothing else. Every figure that moves production (realized accuracy, the estimate's
# error, the gate's fresh items, the bake) reads only UNBIASED labels: organic feedback and the
# uniformly random requested sample.
ORGANIC, REQUESTED_RANDOM, REQUESTED_INFORMATIVE = "organic", "requested-random", "requested-informative"
SOURCES = (ORGANIC, REQUESTED_RANDOM, REQUESTED_INFORMATIVE)
UNBIASED = (ORGANIC, REQUESTED_RANDOM)


# The raw content of a row, deleted after `raw_days` (core/retention.py): one row per prediction row
# with the same id (and, for Postgres's partitions, the same created_at).
raw = Table(
    "prediction_raw", metadata,
    Column("id", LogId, primary_key=True, autoincrement=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("text", Text),  # NULL when the service stores hashes only
    Column("embedding", LargeBinary),  # float32 bytes of the pooled embedding
)

# Every read of text or embedding goes through LOGGED (a row and its raw content, if still there).
LOGGED = predictions.outerjoin(raw, and_(raw.c.id == predictions.c.id, raw.c.created_at == predictions.c.created_at))
TEXT = func.coalesce(raw.c.text, predictions.c.text)
EMBEDDING = func.coalesce(raw.c.embedding, predictions.c.embedding)


def unbiased_label():
    """SQL: the row's label, if any, is a random sample of its traffic (organic or requested at random)."""
    c = predictions.c
    return or_(c.feedback_source.is_(None), c.feedback_source.in_(UNBIASED))

# Holds: log rows that retention must leave whole (text and embedding) until the need passes: a
# running refinement's fresh rows and the reference it profiles, an unfinished bake's items. A hold
# covers one model's rows from `from_id` on; it ends when released, or at `expires_at` if its owner
# died without releasing it (core/retention.py).
holds = Table(
    "log_holds", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_version", String(255), nullable=False),
    Column("from_id", LogId, nullable=False),
    Column("reason", Text, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
)

# The indexes, made by ensure_schema on both engines (IF NOT EXISTS: an existing log gains them in
# place). RAW is the test for "a legacy row still holds the customer's text or its embedding in its
# own columns"; a query must spell it exactly so for the planner to use the partial index.
RAW = "(text IS NOT NULL OR embedding IS NOT NULL)"
INDEXES = {
    "ix_predictions_model_id": "ON predictions (model_version, id)",
    "ix_predictions_labelled": "ON predictions (model_version, id) WHERE feedback_label IS NOT NULL",
    "ix_predictions_labelled_at": "ON predictions (model_version, feedback_at) WHERE feedback_label IS NOT NULL",
    "ix_predictions_created": "ON predictions (created_at)",
    "ix_predictions_raw": f"ON predictions (id) WHERE {RAW}",
}
POSTGRES_INDEXES = {"ix_predictions_request": "ON predictions (request_id)"}  # SQLite: the column's UNIQUE index
DROPPED_INDEXES = ("ix_predictions_model_created",)  # replaced by ix_predictions_model_id (see the module docstring)


# Columns added after the table first shipped: (name, SQL type), all nullable, so an older log gains
# them in place (one ALTER TABLE each, the same statement on SQLite and Postgres).
ADDED_COLUMNS = (("runtime", "VARCHAR(32)"), ("feedback_source", "VARCHAR(32)"), ("feedback_annotator", "VARCHAR(255)"))


def ensure_schema(engine: Engine) -> None:
    """Create the log's tables (on Postgres, partitioned by day: core/retention.py), add the columns
    and indexes newer versions use to a log made by an older one, and drop the indexes they replaced."""
    if engine.dialect.name == "postgresql":
        from core import partitions  # noqa: PLC0415 - Postgres only

        partitions.ensure_partitioned_table(engine, predictions)
        partitions.ensure_partitioned_table(engine, raw)
        create_tables(metadata, engine, skip=(predictions, raw))
    else:
        create_tables(metadata, engine)
    present = {c["name"] for c in inspect(engine).get_columns("predictions")}
    missing = [(name, kind) for name, kind in ADDED_COLUMNS if name not in present]
    for name, kind in missing:  # names and types are the constants above
        _ddl(engine, f"ALTER TABLE predictions ADD COLUMN IF NOT EXISTS {name} {kind}" if engine.dialect.name == "postgresql"
             else f"ALTER TABLE predictions ADD COLUMN {name} {kind}",
             done=lambda name=name: name in {c["name"] for c in inspect(engine).get_columns("predictions")})
    existing = {ix["name"] for ix in inspect(engine).get_indexes("predictions")}
    wanted = {**INDEXES, **(POSTGRES_INDEXES if engine.dialect.name == "postgresql" else {})}
    for name, spec in wanted.items():
        if name not in existing:  # building one on a big old log takes a while, once (docs/deploy.md)
            _ddl(engine, f"CREATE INDEX IF NOT EXISTS {name} {spec}")
    for name in DROPPED_INDEXES:
        if name in existing:
            _ddl(engine, f"DROP INDEX IF EXISTS {name}")


def _ddl(engine: Engine, statement: str, done=None) -> None:
    """One schema change; another process making the same change at the same moment is not an error."""
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":  # wait little behind long readers, then retry at the next start
                conn.execute(sql_text("SET LOCAL lock_timeout = '5s'"))
            conn.execute(sql_text(statement))
    except (OperationalError, ProgrammingError):  # another process did it first
        if done is not None and not done():
            raise


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class LoggedPrediction:
    request_id: str
    text: str
    label: str
    confidence: float
    probs: dict[str, float]
    descriptors: dict[str, float]
    truncated: bool
    embedding: np.ndarray


def write_batch(engine: Engine, model_version: str, rows: Sequence[LoggedPrediction], store_text: bool = True,
                runtime: str = "torch", at: dt.datetime | None = None) -> None:
    """Insert a batch of predictions in one transaction (all or nothing); `runtime` is what computed
    them (the monitor tests them against the reference profiled with the same runtime). `at` (default
    now) is for simulated time only: benchmarks and tests of retention write days in seconds."""
    if not rows:
        return
    now = at or dt.datetime.now(dt.timezone.utc)
    values = [{
        "request_id": r.request_id,
        "created_at": now,
        "model_version": model_version,
        "text_sha256": text_hash(r.text),
        "label": r.label,
        "confidence": float(r.confidence),
        "probs": json.dumps(r.probs),
        **{k: float(r.descriptors[k]) for k in DESCRIPTOR_COLUMNS},
        "truncated": bool(r.truncated),
        "runtime": runtime,
    } for r in rows]
    c = predictions.c
    with engine.begin() as conn:
        conn.execute(predictions.insert(), values)
        # the new ids by request id (unique): one indexed read, where INSERT … RETURNING in the
        # parameters' order makes SQLAlchemy insert row by row (measured: 64 statements for 64 rows)
        ids = dict(conn.execute(select(c.request_id, c.id).where(c.request_id.in_([r.request_id for r in rows]),
                                                                  c.created_at == now)).all())
        conn.execute(raw.insert(), [{
            "id": ids[r.request_id], "created_at": now, "text": r.text if store_text else None,
            "embedding": np.asarray(r.embedding, dtype=np.float32).tobytes(),
        } for r in rows])


class FeedbackError(Exception):
    """Feedback that cannot be applied; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def record_feedback(engine: Engine, items: Sequence[tuple[str, str]], known_labels_by_version, source: str = ORGANIC,
                    annotator: str | None = None) -> list[dict]:
    """Join late labels to logged predictions, all in one transaction: the one path every label takes
    (`/feedback`, answers from the annotation tool, `driftloop labels import`).

    `known_labels_by_version(model_version)` returns the label names of the model that produced a
    prediction. Unknown request id → FeedbackError(404); unknown label → FeedbackError(422); the same
    label from the same source again is a no-op (idempotent); a different label, or the same from
    another source, replaces the earlier one (with its `source` and `annotator`: the newest answer
    is the label, and its provenance says how it came).
    """
    if source not in SOURCES:
        raise ValueError(f"unknown label source {source!r}; one of {', '.join(SOURCES)}")
    now = dt.datetime.now(dt.timezone.utc)
    results = []
    with engine.begin() as conn:
        for request_id, label in items:
            row = conn.execute(select(predictions.c.model_version, predictions.c.feedback_label, predictions.c.feedback_source)
                               .where(predictions.c.request_id == request_id)).first()
            if row is None:
                raise FeedbackError(404, f"unknown request_id {request_id!r}")
            labels = known_labels_by_version(row.model_version)
            if label not in labels:
                raise FeedbackError(422, f"unknown label {label!r} for request_id {request_id!r}; expected one of {', '.join(labels)}")
            if row.feedback_label == label and (row.feedback_source or ORGANIC) == source:
                results.append({"request_id": request_id, "label": label, "status": "unchanged"})
                continue
            conn.execute(update(predictions).where(predictions.c.request_id == request_id)
                         .values(feedback_label=label, feedback_at=now, feedback_source=source, feedback_annotator=annotator))
            results.append({"request_id": request_id, "label": label,
                            "status": "recorded" if row.feedback_label is None else "replaced"})
    return results


# --------------------------------------------------------------------------- reads


def count(engine: Engine, model_version: str | None = None) -> int:
    q = select(func.count()).select_from(predictions)
    if model_version:
        q = q.where(predictions.c.model_version == model_version)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def first_id_at(engine: Engine, when: dt.datetime) -> int | None:
    """The id of the first row logged at or after `when` (None: none yet): one probe of
    `ix_predictions_created`, so that a time bound becomes an id range on the other indexes. Ids
    follow commit order, times the writer's clock: rows of concurrent writers can sit a few
    milliseconds out of order at the boundary, which a window or a day-sized cutoff does not see."""
    c = predictions.c
    first_at = select(func.min(c.created_at)).where(c.created_at >= when).scalar_subquery()
    with engine.connect() as conn:  # a batch shares one time: the smallest id of the first time
        return conn.execute(select(func.min(c.id)).where(c.created_at == first_at)).scalar()


def _capped_count(conn, query, cap: int | None) -> int:
    """COUNT(*) of `query`'s rows, reading at most `cap` of them (None: all)."""
    if cap is not None:
        query = query.limit(cap)
    return int(conn.execute(select(func.count()).select_from(query.subquery())).scalar_one())


def recent_texts(engine: Engine, model_version: str, since_id: int | None, limit: int) -> list[str]:
    """The newest `limit` logged texts of `model_version` (from log id `since_id` on), oldest first:
    what the model was serving, for a successor's reference profile."""
    c = predictions.c
    q = (select(TEXT).select_from(LOGGED).where(c.model_version == model_version, TEXT.is_not(None))
         .order_by(c.id.desc()).limit(limit))
    if since_id is not None:
        q = q.where(c.id >= since_id)
    with engine.connect() as conn:
        return [t for (t,) in conn.execute(q)][::-1]


def labelled_after(engine: Engine, model_version: str, after: dt.datetime, limit: int) -> list[tuple[str, str, str]]:
    """(text, served label, feedback label) of `model_version`'s predictions logged after `after`
    with an unbiased label (UNBIASED), oldest first: the items a bake check pairs the old champion on."""
    c = predictions.c
    first = first_id_at(engine, after)
    if first is None:
        return []
    q = (select(TEXT, c.label, c.feedback_label).select_from(LOGGED)
         .where(c.model_version == model_version, c.feedback_label.is_not(None), c.id >= first, TEXT.is_not(None),
                c.created_at >= after, unbiased_label())
         .order_by(c.id).limit(limit))
    with engine.connect() as conn:
        return [(t, y, f) for t, y, f in conn.execute(q)]


def labelled_since_count(engine: Engine, model_version: str, after: dt.datetime, cap: int | None = None) -> tuple[int, int]:
    """(labelled, of which with text) among `model_version`'s predictions logged after `after`, each
    counted up to `cap`: how far a bake has come, and whether it can ever finish (hash-only rows
    carry no text for the previous champion to score)."""
    c = predictions.c
    first = first_id_at(engine, after)
    if first is None:
        return 0, 0
    base = select(c.id).where(c.model_version == model_version, c.feedback_label.is_not(None), c.id >= first,
                              c.created_at >= after, unbiased_label()).order_by(c.id)
    with engine.connect() as conn:
        return _capped_count(conn, base, cap), _capped_count(conn, base.select_from(LOGGED).where(TEXT.is_not(None)), cap)


def texts_kept(engine: Engine, model_version: str, from_id: int = 0, sample: int = 100) -> bool | None:
    """Whether the service logs `model_version`'s texts: any text among its newest `sample` rows
    from `from_id` on (None: no rows yet). False means hash-only mode (`store_text=False`)."""
    c = predictions.c
    recent = (select(TEXT.label("text")).select_from(LOGGED).where(c.model_version == model_version, c.id >= from_id)
              .order_by(c.id.desc()).limit(sample).subquery())
    with engine.connect() as conn:
        n, with_text = conn.execute(select(func.count(), func.count(recent.c.text))).one()
    return None if not n else bool(with_text)


def unbiased_accuracy(engine: Engine, model_version: str, first_id: int, limit: int = 5000) -> tuple[float | None, int]:
    """(accuracy, n) of `model_version` on its newest `limit` rows from `first_id` on with an unbiased
    label (UNBIASED): the realized accuracy of a drift streak, which outlives any one window."""
    c = predictions.c
    recent = (select(case((c.label == c.feedback_label, 1.0), else_=0.0).label("hit"))
              .where(c.model_version == model_version, c.feedback_label.is_not(None), c.id >= first_id, unbiased_label())
              .order_by(c.id.desc()).limit(limit).subquery())
    with engine.connect() as conn:
        acc, n = conn.execute(select(func.avg(recent.c.hit), func.count())).one()
    return (None if not n else float(acc)), int(n)


def estimation_error(engine: Engine, model_version: str, limit: int = 5000) -> tuple[float | None, int]:
    """(mean confidence − accuracy, n) over the newest `limit` predictions of `model_version` with an
    unbiased label: how far the label-free estimate (mean calibrated confidence) is off on this
    model's own recent traffic. Bounded, because the controller asks at every run and a model may serve for months."""
    c = predictions.c
    recent = (select(c.confidence.label("confidence"), case((c.label == c.feedback_label, 1.0), else_=0.0).label("hit"))
              .where(c.model_version == model_version, c.feedback_label.is_not(None), unbiased_label())
              .order_by(c.id.desc()).limit(limit).subquery())
    q = select(func.avg(recent.c.confidence), func.avg(recent.c.hit), func.count())
    with engine.connect() as conn:
        conf, acc, n = conn.execute(q).one()
    return (None if not n else float(conf) - float(acc)), int(n)


def recent_runtime(engine: Engine, model_version: str, limit: int = 1000) -> str | None:
    """The runtime that computed most of `model_version`'s newest `limit` predictions (NULL: torch),
    None if it has none: what actually serves it, whatever process serves it."""
    c = predictions.c
    recent = select(c.runtime).where(c.model_version == model_version).order_by(c.id.desc()).limit(limit).subquery()
    q = select(recent.c.runtime, func.count()).group_by(recent.c.runtime)
    with engine.connect() as conn:
        counts: dict[str, int] = {}
        for runtime, n in conn.execute(q):
            counts[runtime or "torch"] = counts.get(runtime or "torch", 0) + int(n)
    return max(counts, key=counts.get) if counts else None


def count_since(engine: Engine, model_version: str, after_id: int, cap: int | None = None) -> int:
    """How many predictions of `model_version` were logged after row `after_id` (counted up to `cap`)."""
    c = predictions.c
    q = select(c.id).where(c.model_version == model_version, c.id > after_id).order_by(c.id)
    with engine.connect() as conn:
        return _capped_count(conn, q, cap)


def latest_model_version(engine: Engine) -> str | None:
    """The model version of the most recent logged prediction (what served last)."""
    with engine.connect() as conn:
        return conn.execute(select(predictions.c.model_version).order_by(predictions.c.id.desc()).limit(1)).scalar()


def window_rows(engine: Engine, model_version: str, *, last: int | None = 1000, since: dt.datetime | None = None,
                until: dt.datetime | None = None, up_to_id: int | None = None) -> list[Row]:
    """The last `last` predictions of `model_version` (optionally within [since, until) and id ≤ up_to_id),
    oldest first, with what a monitor window needs (monitoring/window.py builds the frame)."""
    c = predictions.c
    query = select(c.id, c.created_at, c.label, c.confidence, c.probs, c.truncated, EMBEDDING.label("embedding"),
                   c.feedback_label, c.feedback_source, c.runtime,
                   *(c[name] for name in DESCRIPTOR_COLUMNS)).select_from(LOGGED).where(c.model_version == model_version)
    if since is not None:
        first = first_id_at(engine, since)
        if first is None:
            return []
        query = query.where(c.id >= first, c.created_at >= since)
    if until is not None:
        query = query.where(c.created_at < until)
    if up_to_id is not None:
        query = query.where(c.id <= up_to_id)
    query = query.order_by(c.id.desc())
    if last is not None:
        query = query.limit(last)
    with engine.connect() as conn:
        return conn.execute(query).all()[::-1]


def labelled_count(engine: Engine, model_version: str, since: dt.datetime | None = None, from_id: int | None = None,
                   with_text: bool = False, cap: int | None = 10_000) -> int:
    """Labelled predictions of `model_version` (labelled after `since`, on log rows from `from_id` on,
    only those whose text was kept if `with_text`): the labels a refinement could train on. Counted
    newest first up to `cap` (a refinement takes at most `max_fresh_labels`): the policy asks at
    every pass, and without a drift streak nothing else bounds the rows it would read."""
    c = predictions.c
    # no ORDER BY: any `cap` rows answer a capped count, and the planner may then take the label-time
    # range (ix_predictions_labelled_at): late labels land on old rows, which an id bound would miss
    q = select(c.id).where(c.model_version == model_version, c.feedback_label.is_not(None))
    if with_text:
        q = q.select_from(LOGGED).where(TEXT.is_not(None))
    if since is not None:
        q = q.where(c.feedback_at >= since)
    if from_id is not None:
        q = q.where(c.id >= from_id)
    with engine.connect() as conn:
        return _capped_count(conn, q, cap)


def fresh_labelled(engine: Engine, model_version: str, since_id: int | None, limit: int) -> list[tuple[int, str, str, str]]:
    """(log id, text, label, source) of labelled predictions of `model_version`, newest `limit`,
    deduplicated by text, oldest first: a refinement's fresh rows (all of them train; only UNBIASED
    ones may be gate items)."""
    c = predictions.c
    q = (select(c.id, TEXT, c.feedback_label, c.feedback_source).select_from(LOGGED)
         .where(c.model_version == model_version, c.feedback_label.is_not(None), TEXT.is_not(None))
         .order_by(c.id.desc()).limit(limit))
    if since_id is not None:
        q = q.where(c.id >= since_id)
    seen, out = set(), []
    with engine.connect() as conn:
        for rid, text, label, source in conn.execute(q):
            if text not in seen:
                seen.add(text)
                out.append((rid, text, label, source or ORGANIC))
    return out[::-1]


def unlabelled(engine: Engine, model_version: str, first_id: int, last_id: int | None = None, limit: int = 5000,
               with_embedding: bool = False) -> list[Row]:
    """Newest-first unlabelled predictions of `model_version` with text, ids in [first_id, last_id]:
    what a label request may ask about (id, request_id, text_sha256, probs, and the embedding if
    asked). Bounded by the id range and `limit`."""
    c = predictions.c
    columns = [c.id, c.request_id, c.text_sha256, c.probs] + ([EMBEDDING.label("embedding")] if with_embedding else [])
    q = (select(*columns).select_from(LOGGED).where(c.model_version == model_version, c.id >= first_id, c.feedback_label.is_(None),
                                                    TEXT.is_not(None)).order_by(c.id.desc()).limit(limit))
    if last_id is not None:
        q = q.where(c.id <= last_id)
    if with_embedding:
        q = q.where(EMBEDDING.is_not(None))
    with engine.connect() as conn:
        return conn.execute(q).all()


def confident_unlabelled(engine: Engine, model_version: str, since_id: int | None, min_conf: float,
                         limit: int) -> list[tuple[str, str]]:
    """(text, predicted label) of unlabelled predictions served with confidence ≥ `min_conf`, newest
    first: self-training rows."""
    c = predictions.c
    q = (select(TEXT, c.label).select_from(LOGGED)
         .where(c.model_version == model_version, c.feedback_label.is_(None), TEXT.is_not(None), c.confidence >= min_conf)
         .order_by(c.id.desc()).limit(limit))
    if since_id is not None:
        q = q.where(c.id >= since_id)
    with engine.connect() as conn:
        return [(t, y) for t, y in conn.execute(q)]


def max_id(engine: Engine) -> int:
    """The newest log row's id (0 for an empty log)."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.max(predictions.c.id))).scalar_one() or 0)


def request_ids(engine: Engine) -> set[str]:
    """Every logged request id: to check that each acknowledged prediction is in the log."""
    with engine.connect() as conn:
        return {r for (r,) in conn.execute(select(predictions.c.request_id))}
