"""The prediction log on Postgres: tables partitioned by day, so retention drops days, not rows.

Deleting a day of a busy log row by row rewrites and vacuums gigabytes and holds row locks for
minutes; `DROP TABLE` of that day's partition is a catalogue change that takes milliseconds and
returns the space at once. So on Postgres `predictions` and its raw content `prediction_raw`
(core/predlog.py) are each declared `PARTITION BY RANGE (created_at)`, with one partition per UTC
day (`predictions_pYYYYMMDD`, `prediction_raw_pYYYYMMDD`) made ahead of time by every
process that opens the log (the service at start, the controller at every retention run), and a
DEFAULT partition that catches rows of a day nobody made in time (retention deletes those row by
row). Everything else (queries, indexes, writes) is the same SQL as on SQLite: the parent's indexes
apply to every partition, present and future.

Postgres requires a partitioned table's unique keys to contain the partition key: the primary key
is `(id, created_at)` (ids still come from one sequence, so they stay unique and ordered) and
`request_id` is indexed but not unique (the service makes them with uuid4).
"""

from __future__ import annotations

import datetime as dt
import logging
import re

from sqlalchemy import Table, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger("driftloop.partitions")

TABLE = "predictions"
RAW_TABLE = "prediction_raw"
TABLES = (TABLE, RAW_TABLE)  # each partitioned by day on its own
DEFAULT_PARTITION = f"{TABLE}_default"


def default_partition(table: str = TABLE) -> str:
    return f"{table}_default"


def _partition_name(table: str) -> re.Pattern:
    return re.compile(rf"^{table}_p(\d{{8}})$")

LOCK_KEY = 0x6472_6966  # pg_advisory_xact_lock key: one process at a time changes the partitions
DAYS_AHEAD = 7  # a week of partitions exists ahead of time: a controller may be down that long before rows fall into DEFAULT


def _column_ddl(table: Table) -> list[str]:
    dialect = postgresql.dialect()
    out = []
    for column in table.columns:
        if column.name == "id":  # the log's ids come from one sequence; the raw content takes its row's id
            out.append(f"id BIGINT NOT NULL DEFAULT nextval('{TABLE}_id_seq')" if table.name == TABLE else "id BIGINT NOT NULL")
            continue
        kind = column.type.compile(dialect=dialect)
        out.append(f"{column.name} {kind}{'' if column.nullable else ' NOT NULL'}")
    return out


def is_partitioned(conn: Connection, table: str = TABLE) -> bool | None:
    """True: the table is partitioned; False: an unpartitioned (older) log; None: no such table yet."""
    kind = conn.execute(text("SELECT c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                             "WHERE c.relname = :name AND n.nspname = current_schema()"), {"name": table}).scalar()
    return None if kind is None else kind == "p"


def ensure_partitioned_table(engine: Engine, table: Table, today: dt.date | None = None) -> None:
    """Create the partitioned table (if there is none yet) and its day partitions from yesterday to
    DAYS_AHEAD days ahead. An unpartitioned log made by an older driftloop is left as it is: turning
    it into a partitioned one rewrites every row under an exclusive lock (see docs/deploy.md)."""
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '5s'"))
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        state = is_partitioned(conn, table.name)
        if state is None:
            if table.name == TABLE:
                conn.execute(text(f"CREATE SEQUENCE IF NOT EXISTS {TABLE}_id_seq AS BIGINT"))
            columns = ",\n  ".join(_column_ddl(table))
            conn.execute(text(f"CREATE TABLE {table.name} (\n  {columns},\n  PRIMARY KEY (id, created_at)\n) "
                              "PARTITION BY RANGE (created_at)"))
            if table.name == TABLE:
                conn.execute(text(f"ALTER SEQUENCE {TABLE}_id_seq OWNED BY {TABLE}.id"))
            conn.execute(text(f"CREATE TABLE {default_partition(table.name)} PARTITION OF {table.name} DEFAULT"))
        elif state is False:
            return
    ensure_days(engine, today=today)


def day_partition(day: dt.date, table: str = TABLE) -> str:
    return f"{table}_p{day:%Y%m%d}"


def partitions(conn: Connection, table: str = TABLE) -> dict[str, dt.date | None]:
    """A table's partitions: name → the UTC day it holds (None for DEFAULT)."""
    rows = conn.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                             "WHERE i.inhparent = to_regclass(:name)"), {"name": table}).scalars()
    pattern = _partition_name(table)
    out: dict[str, dt.date | None] = {}
    for name in rows:
        match = pattern.match(name)
        out[name] = dt.datetime.strptime(match.group(1), "%Y%m%d").date() if match else None
    return out


def _bounds(day: dt.date) -> tuple[str, str]:
    start = dt.datetime.combine(day, dt.time(), tzinfo=dt.timezone.utc)
    return start.isoformat(), (start + dt.timedelta(days=1)).isoformat()


def ensure_days(engine: Engine, today: dt.date | None = None, ahead: int = DAYS_AHEAD) -> list[str]:
    """Make the day partitions from yesterday to `ahead` days from `today` that are missing; returns
    the ones made. A day whose rows already fell into DEFAULT is skipped (Postgres refuses a
    partition that DEFAULT's rows would violate); retention deletes those rows by age."""
    today = today or dt.datetime.now(dt.timezone.utc).date()
    made = []
    with engine.begin() as conn:
        conn.execute(text("SET LOCAL lock_timeout = '5s'"))
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
        for table in TABLES:
            if not is_partitioned(conn, table):
                continue
            have = set(partitions(conn, table))
            default = default_partition(table)
            for offset in range(-1, ahead + 1):
                day = today + dt.timedelta(days=offset)
                name = day_partition(day, table)
                if name in have:
                    continue
                start, end = _bounds(day)
                stray = conn.execute(text(f"SELECT 1 FROM {default} WHERE created_at >= :s AND created_at < :e LIMIT 1"),
                                     {"s": start, "e": end}).first()
                if stray is not None:
                    log.warning("partition %s not made: rows of that day are already in %s", name, default)
                    continue
                conn.execute(text(f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES FROM ('{start}') TO ('{end}')"))
                made.append(name)
    return made


def drop_days_before(engine: Engine, cutoff: dt.datetime, keep=lambda conn, name: None,
                     table: str = TABLE, spare_empty_from: dt.date | None = None) -> tuple[list[str], list[str]]:
    """Drop every day partition of `table` that ends at or before `cutoff`, except those
    `keep(conn, name)` gives a reason for (a row still needed). Returns (dropped, kept with their
    reasons). Each drop is its own short transaction: it needs a brief exclusive lock on the parent,
    and a lock it cannot get within 5 s is a day left for the next run, not a stalled writer.
    `spare_empty_from`: empty partitions of this day or later stay (ensure_days makes them from
    yesterday on: dropping them would only have the next run make them again)."""
    dropped, kept = [], []
    with engine.connect() as conn:
        names = sorted(n for n, day in partitions(conn, table).items()
                       if day is not None and dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), tzinfo=dt.timezone.utc) <= cutoff
                       and not (spare_empty_from is not None and day >= spare_empty_from
                                and conn.execute(text(f"SELECT 1 FROM {n} LIMIT 1")).first() is None))
    for name in names:
        try:
            with engine.begin() as conn:
                conn.execute(text("SET LOCAL lock_timeout = '5s'"))
                reason = keep(conn, name)
                if reason:
                    kept.append(f"{name}: {reason}")
                    continue
                conn.execute(text(f"DROP TABLE IF EXISTS {name}"))  # name: from the catalogue, matched by _partition_name
                dropped.append(name)
        except Exception as err:  # noqa: BLE001 - a busy table is retried at the next run
            kept.append(f"{name}: not dropped this time ({type(err).__name__}: {str(err).splitlines()[0]})")
    return dropped, kept
