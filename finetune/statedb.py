"""The state DB engine: SQLite (WAL) by default, any SQLAlchemy URL (Postgres) by configuration.

Each package declares its own tables on its own ``MetaData``; this module only makes engines that
behave the same everywhere (foreign keys, WAL, a busy timeout instead of instant "database is locked").
"""

from __future__ import annotations

import threading

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine

from finetune.home import state_db_url

_engines: dict[str, Engine] = {}
_lock = threading.Lock()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer; crash-safe
    cur.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss, not just kill -9
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def get_engine(url: str | None = None) -> Engine:
    """One engine per URL per process (engines pool connections; creating them is not free)."""
    url = url or state_db_url()
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _engines[url] = engine
        return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, and child processes after fork)."""
    with _lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
