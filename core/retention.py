"""Retention of the prediction log: raw content for days, the rest for months, then nothing.

A prediction costs ~2.2 KB in the log, 70 % of it the float32 embedding and most of the rest the
customer's text (bench/logscale.py); at 100 predictions/s that is ~19 GB a day. Both sit in the side
table `prediction_raw` (core/predlog.py), so that deleting them frees their space. Both are needed only
for a while: the monitor tests the newest window, a refinement trains on the labelled rows of the
current drift streak and profiles the newest traffic, a bake pairs the items served since a
promotion, and all a model needs for good is copied into the content-addressed dataset store when
the model is made. So, run on schedule by the leading controller (`driftloop log compact` by hand):

- after `raw_days` a row's text and embedding are deleted (on Postgres, whole days of
  `prediction_raw` are dropped) and the row keeps the rest (label, confidence,
  calibrated scores, descriptors, feedback, runtime, text hash): trends, accuracy and drift on
  descriptors stay answerable for `days`;
- after `days` the row is deleted (on Postgres, whole day partitions are dropped: core/partitions.py);
- rows under a hold (`hold()`: a running refinement, an unfinished bake) are left whole until it
  is released or expires;
- the work goes in batches of `batch_rows`, each its own short transaction with a pause after it,
  so the service's writes (one transaction per gathered batch) wait at most one batch;
- SQLite returns freed pages to the file system in steps (`PRAGMA incremental_vacuum`) on a log
  created with incremental auto-vacuum (every new one: core/statedb.py); an older log reuses its
  freed pages, so it stops growing, and `driftloop log vacuum` converts it once (a full VACUUM).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import MetaData, and_, delete, func, not_, select, text as sql_text, update
from sqlalchemy.engine import Engine, make_url

from core import predlog
from core.predlog import holds, predictions

log = logging.getLogger("driftloop.retention")
UTC = dt.timezone.utc


class RetentionConfig(BaseModel):
    """How long the prediction log keeps what. Defaults, argued:

    `raw_days` 7: raw text and embeddings serve the newest monitor windows (minutes to hours), the
    labels of a drift streak (hours to a day or two: feedback arrives late) and a bake (at 2 %
    feedback and 1 request/s, 200 labelled items take ~3 hours). A week covers a label delay of
    several days with room, and keeps no customer text longer than that (data minimisation: the
    text is the personal part); everything a model needs for good is already in the dataset store.
    `days` 90: a quarter of accuracy, confidence and descriptor trends for dashboards and audits,
    at the compacted row's size: 0.43 KB on SQLite, 0.57 KB on Postgres, against 2.5 KB for a whole
    row (bench/logscale.py, docs/benchmarks.md). Disk at steady state ≈ traffic/day × (raw_days ×
    2.5 KB + (days − raw_days) × 0.43 KB): the month measured 1.006x that.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="False: the controller's retention job does nothing (the log only grows).")
    raw_days: float = Field(7.0, gt=0, description="Days a row keeps its text and embedding.")
    days: float = Field(90.0, gt=0, description="Days a row is kept at all.")
    interval_s: float = Field(3600.0, ge=10, description="Seconds between the controller's retention runs.")
    batch_rows: int = Field(1000, ge=1, le=100_000, description=(
        "Rows per delete or compaction transaction: the longest a service write waits behind retention."))
    pause_s: float = Field(0.05, ge=0, description="Pause after each batch, so writers take the lock in between.")
    max_run_s: float = Field(600.0, gt=0, description="A run stops after this long and resumes at the next one.")
    vacuum_pages: int = Field(2048, ge=1, description="SQLite: free pages returned to the file system per step (4 KiB each).")
    hold_ttl_s: float = Field(24 * 3600.0, gt=0, description="A hold whose owner died without releasing it ends after this long.")

    @model_validator(mode="after")
    def _ordered(self) -> "RetentionConfig":
        if self.raw_days > self.days:
            raise ValueError(f"retention.raw_days {self.raw_days} > retention.days {self.days}: a row cannot keep its "
                             "text longer than the row itself")
        return self


@dataclass(frozen=True)
class Hold:
    model_version: str
    from_id: int
    reason: str


@dataclass
class RunResult:
    compacted: int = 0
    deleted: int = 0
    partitions_dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # what was left and why, one line each
    vacuumed_pages: int = 0
    holds: list[str] = field(default_factory=list)
    finished: bool = True  # False: stopped at max_run_s with work left
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- holds


def hold(engine: Engine, model_version: str, from_id: int, reason: str, ttl_s: float = 24 * 3600.0) -> int:
    """Keep `model_version`'s rows from `from_id` on whole until `release` (or `ttl_s` from now)."""
    now = dt.datetime.now(UTC)
    with engine.begin() as conn:
        row = conn.execute(holds.insert().values(model_version=model_version, from_id=int(from_id), reason=reason,
                                                 created_at=now, expires_at=now + dt.timedelta(seconds=ttl_s)))
        return int(row.inserted_primary_key[0])


def release(engine: Engine, hold_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(delete(holds).where(holds.c.id == hold_id))


def active_holds(engine: Engine, now: dt.datetime | None = None) -> list[Hold]:
    """Holds in force; expired ones are deleted on the way."""
    now = now or dt.datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(delete(holds).where(holds.c.expires_at < now))
        rows = conn.execute(select(holds.c.model_version, holds.c.from_id, holds.c.reason)).all()
    return [Hold(m, int(f), r) for m, f, r in rows]


def _not_held(held: Iterable[Hold], c):
    terms = [not_(and_(c.model_version == h.model_version, c.id >= h.from_id)) for h in held]
    return and_(*terms) if terms else None


# --------------------------------------------------------------------------- the run


def _partitioned(engine: Engine, table: str = "predictions") -> bool:
    from core import partitions  # noqa: PLC0415 - Postgres only

    with engine.connect() as conn:
        return bool(partitions.is_partitioned(conn, table))


def _cut_id(engine: Engine, cutoff: dt.datetime) -> int:
    """Rows with id < this were logged before `cutoff` (the whole log if none was logged after)."""
    first = predlog.first_id_at(engine, cutoff)
    return first if first is not None else predlog.max_id(engine) + 1


def _batches(engine: Engine, pick, act, config: RetentionConfig, deadline: float) -> tuple[int, bool]:
    """Run `act(conn, ids)` on batches of ids from `pick(after_id, limit)` (ascending ids, each batch
    after the last id of the one before: rows a filter skips are read once per run, not once per
    batch), each batch in its own transaction; returns (rows, finished)."""
    done, after = 0, 0
    while True:
        if time.monotonic() > deadline:
            return done, False
        with engine.begin() as conn:
            ids = [i for (i,) in conn.execute(pick(after, config.batch_rows))]
            if not ids:
                return done, True
            act(conn, ids)
        done, after = done + len(ids), ids[-1]
        if config.pause_s:
            time.sleep(config.pause_s)


def _day_start(when: dt.datetime) -> dt.datetime:
    return dt.datetime.combine(when.astimezone(UTC).date(), dt.time(), tzinfo=UTC)


@dataclass
class _Run:
    """What every stage of one run reads: the log, its settings, the cutoffs and the holds."""
    engine: Engine
    config: RetentionConfig
    now: dt.datetime
    held: list[Hold]
    deadline: float

    delete_before: dt.datetime = field(init=False)  # rows logged before this go
    raw_before: dt.datetime = field(init=False)  # text and embedding logged before this go

    def __post_init__(self) -> None:
        self.delete_before = self.now - dt.timedelta(days=self.config.days)
        self.raw_before = self.now - dt.timedelta(days=self.config.raw_days)

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def held_in(self, conn, lo: int | None, hi: int | None) -> str | None:
        """Why rows with ids in [lo, hi] are still needed (None: they are not): one index probe per hold."""
        if lo is None:
            return None
        c = predictions.c
        for h in self.held:
            hit = conn.execute(select(c.id).where(c.model_version == h.model_version, c.id >= max(int(lo), h.from_id),
                                                  c.id <= int(hi)).limit(1)).first()
            if hit is not None:
                return f"held ({h.reason})"
        return None


def _span(conn, name: str) -> tuple[int | None, int | None]:  # name: a partition, from the catalogue
    return conn.execute(sql_text(f"SELECT min(id), max(id) FROM {name}")).one()


def run(engine: Engine, config: RetentionConfig, *, now: dt.datetime | None = None,
        extra_holds: Iterable[Hold] = ()) -> RunResult:
    """One retention run: drop or delete rows older than `days`, delete the text and embedding of
    rows older than `raw_days`, then give freed space back (SQLite). Rows under a hold stay whole.
    Each stage runs only if the one before finished inside `max_run_s`; the next run resumes."""
    started = time.monotonic()
    predlog.ensure_schema(engine)
    held = active_holds(engine) + list(extra_holds)  # holds expire in real time, whatever `now` simulates
    ctx = _Run(engine, config, now or dt.datetime.now(UTC), held, started + config.max_run_s)
    result = RunResult(holds=[f"{h.model_version} from log id {h.from_id}: {h.reason}" for h in held])
    partitioned = ctx.postgres and _partitioned(engine)
    raw_partitioned = ctx.postgres and _partitioned(engine, predlog.raw.name)
    if ctx.postgres:
        _drop_days(ctx, result, partitioned=partitioned, raw_partitioned=raw_partitioned)
    result.deleted, finished = _delete_old_rows(ctx, partitioned=partitioned)
    if finished:
        compacted, finished = _compact_raw(ctx, raw_partitioned=raw_partitioned)
        result.compacted += compacted
    if finished and engine.dialect.name == "sqlite":
        result.vacuumed_pages, finished = incremental_vacuum(engine, config, ctx.deadline)
    result.kept += _kept_by_holds(ctx)
    result.finished = finished
    result.seconds = round(time.monotonic() - started, 3)
    log.info("retention: %d rows compacted, %d deleted, %d partitions dropped, %d pages vacuumed%s in %.1fs",
             result.compacted, result.deleted, len(result.partitions_dropped), result.vacuumed_pages,
             "" if finished else " (stopped at max_run_s; resumes next run)", result.seconds)
    return result


def _drop_days(ctx: _Run, result: RunResult, *, partitioned: bool, raw_partitioned: bool) -> None:
    """Postgres: make the coming days' partitions, then drop whole past days (unless held): the log's
    days older than `days`, and `prediction_raw`'s days older than `raw_days`."""
    from core import partitions  # noqa: PLC0415 - Postgres only

    spare_from = ctx.now.date() - dt.timedelta(days=1)
    partitions.ensure_days(ctx.engine, today=ctx.now.date())
    if partitioned:
        dropped, kept = partitions.drop_days_before(ctx.engine, ctx.delete_before, keep=lambda conn, name: ctx.held_in(conn, *_span(conn, name)),
                                                    spare_empty_from=spare_from)
        result.partitions_dropped += dropped
        result.kept += kept
    if not raw_partitioned:
        return
    spans: dict[str, tuple] = {}  # a day's raw content goes whole, a day after its last row is raw_days old

    def keep_raw(conn, name: str) -> str | None:
        spans[name] = _span(conn, name)
        return ctx.held_in(conn, *spans[name])

    for cutoff, compacting in ((ctx.delete_before, False), (ctx.raw_before, True)):  # days whose rows go too first: deleted, not compacted
        dropped, kept = partitions.drop_days_before(ctx.engine, cutoff, keep=keep_raw, table=predlog.raw.name, spare_empty_from=spare_from)
        result.partitions_dropped += dropped
        result.kept += [line for line in kept if line not in result.kept]
        if compacting:  # counted by id span: ids are dense (one sequence) and follow time (a count
                                             # would read the day); backdated rows written between today's can make it overcount
            result.compacted += sum(int(hi) - int(lo) + 1 for name in dropped for lo, hi in [spans[name]] if lo is not None)


def _delete_old_rows(ctx: _Run, *, partitioned: bool) -> tuple[int, bool]:
    """Rows older than `days`: on SQLite (or an unpartitioned Postgres log) by id range; on a
    partitioned log only in DEFAULT (rows of days nobody made a partition for): a day partition goes
    whole in `_drop_days`, at the first run after its last row is `days` old, so rows live between
    `days` and `days` + 1. Returns (rows deleted, finished)."""
    table = predictions
    if partitioned:
        from core import partitions  # noqa: PLC0415 - Postgres only

        table = predictions.to_metadata(MetaData(), name=partitions.DEFAULT_PARTITION)
    t, r = table.c, predlog.raw.c
    delete_before = ctx.delete_before
    cut = _cut_id(ctx.engine, delete_before)
    not_held = _not_held(ctx.held, t)

    def old_rows(after: int, limit: int):
        # DEFAULT is small (only days nobody partitioned) and its rows need not follow id order: by time alone there
        bound = [t.created_at < delete_before] if table is not predictions else [t.id < cut, t.created_at < delete_before]
        q = select(t.id).where(t.id > after, *bound).order_by(t.id).limit(limit)
        return q if not_held is None else q.where(not_held)

    def delete_old(conn, ids: list[int]) -> None:
        conn.execute(delete(predlog.raw).where(r.id.in_(ids)))  # raw content kept past `days` by a hold, if any
        conn.execute(delete(table).where(t.id.in_(ids)))

    return _batches(ctx.engine, old_rows, delete_old, ctx.config, ctx.deadline)


def _compact_raw(ctx: _Run, *, raw_partitioned: bool) -> tuple[int, bool]:
    """Text and embedding older than `raw_days`: rows of `prediction_raw` (on SQLite by id range; on a
    partitioned Postgres log only what the day drops left: held days, DEFAULT, by time alone), then
    the columns of rows logged before the side table existed. Returns (rows compacted, finished)."""
    c, r = predictions.c, predlog.raw.c
    raw_before = ctx.raw_before
    raw_cut = _cut_id(ctx.engine, raw_before)
    free = _not_held(ctx.held, c)

    def raw_rows(after: int, limit: int):
        bound = [r.created_at < _day_start(raw_before)] if raw_partitioned else [r.id < raw_cut, r.created_at < raw_before]
        q = select(r.id).where(r.id > after, *bound).order_by(r.id).limit(limit)
        return q if free is None else q.join(predictions, and_(c.id == r.id, c.created_at == r.created_at)).where(free)

    def legacy_rows(after: int, limit: int):  # a log made before prediction_raw: content in the row itself
        q = (select(c.id).where(sql_text(predlog.RAW), c.id > after, c.id < raw_cut, c.created_at < raw_before)
             .order_by(c.id).limit(limit))
        return q if free is None else q.where(free)

    compacted, finished = 0, True
    for pick, act in ((raw_rows, lambda conn, ids: conn.execute(delete(predlog.raw).where(r.id.in_(ids)))),
                      (legacy_rows, lambda conn, ids: conn.execute(update(predictions).where(c.id.in_(ids)).values(text=None, embedding=None)))):
        if finished:
            n, finished = _batches(ctx.engine, pick, act, ctx.config, ctx.deadline)
            compacted += n
    return compacted, finished


def _kept_by_holds(ctx: _Run) -> list[str]:
    """One line per hold that kept rows raw past `raw_days` (capped count: the line is for people)."""
    if not ctx.held:
        return []
    c = predictions.c
    raw_cut = _cut_id(ctx.engine, ctx.raw_before)
    lines = []
    with ctx.engine.connect() as conn:
        for h in ctx.held:
            n = conn.execute(select(func.count()).select_from(
                select(c.id).select_from(predlog.LOGGED)
                .where(c.model_version == h.model_version, c.id >= h.from_id, c.id < raw_cut, predlog.TEXT.is_not(None)
                       | predlog.EMBEDDING.is_not(None)).limit(1_000_000).subquery())).scalar_one()
            if n:
                lines.append(f"{n} rows of {h.model_version} from log id {h.from_id} kept raw past {ctx.config.raw_days:g} days: {h.reason}")
    return lines


def incremental_vacuum(engine: Engine, config: RetentionConfig, deadline: float) -> tuple[int, bool]:
    """Return SQLite's free pages to the file system, `vacuum_pages` per short write transaction
    (only on a log made with auto_vacuum=INCREMENTAL); then a passive WAL checkpoint, which moves
    the shrunken pages into the main file without waiting for anybody."""
    freed = 0
    with engine.connect() as conn:
        if conn.exec_driver_sql("PRAGMA auto_vacuum").scalar() != 2:
            return 0, True
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            pending = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar())
            conn.rollback()
            if not pending:
                break
            freed += vacuum_step(conn, int(min(pending, config.vacuum_pages)))
        if config.pause_s:
            time.sleep(config.pause_s)
    else:
        return freed, False
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
    return freed, True


def vacuum_step(conn, pages: int) -> int:
    """Return up to `pages` free pages to the file system in one short write transaction; returns how
    many went. The pragma frees one page per step of its statement, and Python's sqlite3 steps a
    statement without result columns once (measured: 1 page per call, whatever N); its executescript
    steps each statement to the end (1,000 pages in 4.5 ms), in autocommit: its own transaction."""
    before = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar())
    conn.rollback()
    conn.connection.driver_connection.executescript(f"PRAGMA incremental_vacuum({int(pages)});")
    after = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar())
    conn.rollback()
    return before - after


def full_vacuum(engine: Engine) -> dict:
    """SQLite: rewrite the whole file once (VACUUM), switching it to incremental auto-vacuum. It
    needs free disk space of the file's size and holds the write lock throughout: the service
    answers 503 meanwhile. Measured: see docs/benchmarks.md (bench/logscale.py)."""
    if engine.dialect.name != "sqlite":
        raise ValueError("VACUUM here is for SQLite; Postgres's autovacuum and dropped partitions return space")
    before = file_bytes(engine)
    started = time.monotonic()
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA auto_vacuum=INCREMENTAL")
        conn.exec_driver_sql("VACUUM")
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return {"bytes_before": before, "bytes_after": file_bytes(engine), "seconds": round(time.monotonic() - started, 1)}


# --------------------------------------------------------------------------- size and growth


def sqlite_path(engine: Engine) -> Path | None:
    if engine.dialect.name != "sqlite":
        return None
    database = make_url(str(engine.url)).database
    return Path(database) if database and database != ":memory:" else None


def file_bytes(engine: Engine) -> int | None:
    """Bytes the state DB takes on disk (SQLite: the file and its WAL; Postgres: every partition of
    the log and of its raw content, with their indexes and TOAST)."""
    path = sqlite_path(engine)
    if path is not None:
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            size = conn.execute(sql_text("SELECT COALESCE(sum(pg_total_relation_size(t.relid)), 0) FROM unnest(ARRAY['predictions', "
                                         "'prediction_raw']) AS n, pg_partition_tree(to_regclass(n)) AS t")).scalar()
        return int(size or 0)
    return None


def disk_usage(engine: Engine) -> tuple[int, int] | None:
    """(free bytes, total bytes) of the file system holding the SQLite log; None for a server DB."""
    path = sqlite_path(engine)
    if path is None:
        return None
    usage = shutil.disk_usage(path.parent if path.parent.exists() else os.getcwd())
    return usage.free, usage.total


def stats(engine: Engine, config: RetentionConfig | None = None, now: dt.datetime | None = None) -> dict:
    """The log's size and age, in O(log n) reads plus the pending count (bounded by the backlog):
    what `/metrics` and `driftloop log status` show.

    `rows` is the id span (newest id − oldest id + 1) on both engines: ids grow by one per row from
    one sequence and retention deletes the oldest, so the span is the count, plus the rows `driftloop
    log forget` removed from the middle and, on Postgres, the ids of rolled-back inserts (a failed
    batch). An exact COUNT(*) would read every row at each scrape; Postgres's own estimate
    (`reltuples`) was measured off by a factor after bulk loads (bench/logscale.py)."""
    config = config or RetentionConfig()
    now = now or dt.datetime.now(UTC)
    c, r = predictions.c, predlog.raw.c
    with engine.connect() as conn:
        # one aggregate per statement: SQLite answers a lone min() or max() from the index's end, both together by a scan
        lo = conn.execute(select(func.min(c.id))).scalar()
        hi = conn.execute(select(func.max(c.id))).scalar()
        oldest_at = conn.execute(select(c.created_at).where(c.id == lo)).scalar() if lo is not None else None
        raw_lo = conn.execute(select(func.min(r.id))).scalar()
        legacy_lo = conn.execute(select(func.min(c.id)).where(sql_text(predlog.RAW))).scalar()
        oldest_raw_id = min((i for i in (raw_lo, legacy_lo) if i is not None), default=None)
        oldest_raw_at = conn.execute(select(c.created_at).where(c.id == oldest_raw_id)).scalar() if oldest_raw_id is not None else None
    rows = 0 if lo is None else int(hi) - int(lo) + 1
    raw_cut = _cut_id(engine, now - dt.timedelta(days=config.raw_days)) if lo is not None else 0
    pending = 0
    if lo is not None:
        with engine.connect() as conn:
            for q in (select(r.id).where(r.id < raw_cut), select(c.id).where(sql_text(predlog.RAW), c.id < raw_cut)):
                pending += int(conn.execute(select(func.count()).select_from(q.subquery())).scalar_one())
    disk = disk_usage(engine)
    return {
        "rows": rows, "max_id": int(hi or 0),
        "oldest_at": oldest_at.isoformat() if oldest_at else None,
        "oldest_raw_at": oldest_raw_at.isoformat() if oldest_raw_at else None,
        "pending_compaction": pending, "bytes": file_bytes(engine),
        "disk_free_bytes": disk[0] if disk else None, "disk_total_bytes": disk[1] if disk else None,
        "raw_days": config.raw_days, "days": config.days,
    }
