"""The state DB engine: SQLite (WAL) by default, any SQLAlchemy URL (Postgres) by configuration.

Each package declares its own tables on its own ``MetaData``; this module only makes engines that
behave the same everywhere (foreign keys, WAL, a busy timeout instead of instant "database is locked";
on Postgres: UTC sessions, a lock and statement timeout instead of a hang) and the one timestamp type
that reads back the same on both engines (`UTCDateTime`).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

from sqlalchemy import DateTime, MetaData, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.types import TypeDecorator

from core.errors import DriftloopError
from core.home import state_db_url

_engines: dict[str, Engine] = {}
_lock = threading.Lock()

# Postgres session limits (milliseconds; environment overrides for unusual deployments). A locked row
# or table answers with an error after PG_LOCK_TIMEOUT_MS, like SQLite's busy timeout, rather than
# blocking a request or a scheduler thread forever; no state-DB statement legitimately runs for a
# minute; a client that died inside a transaction releases its locks after the idle timeout.
PG_LOCK_TIMEOUT_MS = int(os.environ.get("DRIFTLOOP_PG_LOCK_TIMEOUT_MS", "10000"))
PG_STATEMENT_TIMEOUT_MS = int(os.environ.get("DRIFTLOOP_PG_STATEMENT_TIMEOUT_MS", "60000"))
PG_IDLE_IN_TRANSACTION_TIMEOUT_MS = int(os.environ.get("DRIFTLOOP_PG_IDLE_IN_TRANSACTION_TIMEOUT_MS", "60000"))
PG_CONNECT_TIMEOUT_S = 10


class UTCDateTime(TypeDecorator):
    """A timestamp that is always a timezone-aware UTC ``datetime`` in Python, on every engine.

    SQLite has no zone-aware type: SQLAlchemy stores the wall-clock digits, drops the offset (an
    aware non-UTC value would be stored wrong) and reads back a naive value. Postgres's
    ``timestamptz`` keeps the instant and returns it in the session's zone. Converting to UTC on the
    way in (naive values are taken as UTC) and tagging UTC on the way out stores the same instant on
    both and returns the same aware value, so comparisons, arithmetic and ``isoformat()`` agree.
    The column type underneath is unchanged (``DateTime(timezone=True)``): existing databases stay valid.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc)


def create_tables(metadata: MetaData, engine: Engine, skip: tuple = ()) -> None:
    """``metadata.create_all`` that tolerates another process creating the same tables at the same
    moment (two controllers or service workers starting on a fresh Postgres database: the loser's
    CREATE fails with "already exists" or a catalog unique violation; a second look finds the tables)."""
    for attempt in range(3):
        try:
            metadata.create_all(engine, tables=[t for t in metadata.sorted_tables if t not in skip])
            return
        except (ProgrammingError, IntegrityError, OperationalError):
            if attempt == 2:
                raise
            time.sleep(0.05 * (attempt + 1))


DEFAULT_LOCK_TIMEOUT_S = 10.0

SYNCHRONOUS_ENV = "DRIFTLOOP_DB_SYNCHRONOUS"
SYNCHRONOUS_MODES = ("normal", "full")


def sqlite_synchronous() -> str:
    """SQLite's commit policy, `normal` (default) or `full`, from DRIFTLOOP_DB_SYNCHRONOUS.

    Both keep "an answered prediction is in the log" through a crash or kill -9 of any driftloop
    process: in WAL mode a commit is in the WAL file (the OS page cache) before it returns, and the
    next opener replays it. `normal` skips the fsync per commit, so an operating-system crash or a
    power loss can lose the last commits before the next checkpoint (the database itself stays
    consistent); `full` fsyncs the WAL at every commit and survives those too. Measured
    (docs/benchmarks.md): at one client `full` served 8 % fewer requests per second than `normal` in
    one 5-round run (103.4 vs 112.6) and 0.4 % fewer in a 3-round run (99.5 vs 99.9), within this
    machine's noise; at 32-64 clients, one commit per gathered batch, no measurable difference.
    Postgres ignores this (its own `synchronous_commit` applies).
    """
    mode = os.environ.get(SYNCHRONOUS_ENV, "normal").strip().lower()
    if mode not in SYNCHRONOUS_MODES:
        raise DriftloopError(f"invalid {SYNCHRONOUS_ENV}={mode!r}: one of {', '.join(SYNCHRONOUS_MODES)}")
    return mode


def _sqlite_pragmas(lock_timeout_s: float):
    synchronous = sqlite_synchronous()

    def apply(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        # freed pages go back to the OS in steps (core/retention.py) rather than by a full VACUUM, which
        # would lock the log for minutes; takes effect only on a new, empty database (older ones
        # reuse their freed pages, and `driftloop log vacuum` converts them once)
        cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
        cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; crash-safe
        cur.execute("PRAGMA journal_size_limit=67108864")  # a checkpointed WAL is cut back to 64 MiB (retention's bursts)
        cur.execute(f"PRAGMA synchronous={synchronous.upper()}")  # see sqlite_synchronous
        cur.execute(f"PRAGMA busy_timeout={int(lock_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    return apply


def normalize_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` mean psycopg 3 here (the driver driftloop installs;
    SQLAlchemy's default for them is psycopg2, which is not a dependency)."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def _postgres_engine(url: str, lock_timeout_ms: int) -> Engine:
    options = (f"-c timezone=UTC -c lock_timeout={lock_timeout_ms} -c statement_timeout={PG_STATEMENT_TIMEOUT_MS} "
               f"-c idle_in_transaction_session_timeout={PG_IDLE_IN_TRANSACTION_TIMEOUT_MS}")
    return create_engine(
        url,
        pool_pre_ping=True,  # a restarted or failed-over server costs one reconnect, not an error per pooled connection
        pool_size=5, max_overflow=10, pool_timeout=30,
        connect_args={"options": options, "connect_timeout": PG_CONNECT_TIMEOUT_S, "application_name": "driftloop"},
    )


def get_engine(url: str | None = None, lock_timeout_s: float | None = None) -> Engine:
    """One engine per URL (and lock timeout) per process (engines pool connections; creating them is not free).

    `lock_timeout_s`: how long a statement waits for a lock held by another writer before failing
    (SQLite's busy timeout, Postgres's lock_timeout); default 10 s (Postgres: DRIFTLOOP_PG_LOCK_TIMEOUT_MS).
    The service passes a shorter one so a locked state DB answers 503 quickly instead of stalling
    every queued request behind one waiting batch.
    """
    url = normalize_url(url or state_db_url())
    key = url if lock_timeout_s is None else f"{url}#lock={lock_timeout_s}"
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            if url.startswith("sqlite"):
                timeout = DEFAULT_LOCK_TIMEOUT_S if lock_timeout_s is None else lock_timeout_s
                engine = create_engine(url, connect_args={"timeout": timeout, "check_same_thread": False})
                event.listen(engine, "connect", _sqlite_pragmas(timeout))
            elif url.startswith("postgresql"):
                engine = _postgres_engine(url, PG_LOCK_TIMEOUT_MS if lock_timeout_s is None else int(lock_timeout_s * 1000))
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _engines[key] = engine
        return engine


def dispose_engine(url: str) -> None:
    """Close and forget the engine of one URL (a test database about to go away)."""
    url = normalize_url(url)
    with _lock:
        engines = [_engines.pop(k) for k in list(_engines) if k == url or k.startswith(url + "#")]
    for engine in engines:
        engine.dispose()


def dispose_engines() -> None:
    """Close every pooled connection (tests, and child processes after fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
