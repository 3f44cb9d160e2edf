"""The production alias: which registered model serves, with its full history.

BentoML's model store has no aliases (``latest`` is merely the newest), so the pointer lives in the
state DB. Every change is one transaction that writes the history row and moves the pointer
together: a crash at any moment leaves either the old pointer or the new one, never a half state.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sqlalchemy import Column, Integer, MetaData, String, Table, Text, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from core.errors import DriftloopError
from core.statedb import UTCDateTime, create_tables, get_engine

PRODUCTION = "production"

metadata = MetaData()

model_alias = Table(
    "model_alias", metadata,
    Column("alias", String(64), primary_key=True),
    Column("tag", String(255), nullable=False),
    Column("previous_tag", String(255)),
    Column("updated_at", UTCDateTime(), nullable=False),
    Column("version", Integer, nullable=False),  # bumps on every change: cheap polling for the service
)

alias_history = Table(
    "alias_history", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("alias", String(64), nullable=False, index=True),
    Column("action", String(32), nullable=False),  # promote | rollback
    Column("tag", String(255), nullable=False),
    Column("previous_tag", String(255)),
    Column("reason", Text),
    Column("actor", String(64)),
    Column("at", UTCDateTime(), nullable=False),
)


@dataclass
class AliasState:
    alias: str
    tag: str
    previous_tag: str | None
    updated_at: dt.datetime
    version: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["updated_at"] = self.updated_at.isoformat()
        return d


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def ensure_schema(engine: Engine | None = None) -> Engine:
    engine = engine or get_engine()
    create_tables(metadata, engine)
    return engine


def current(alias: str = PRODUCTION, engine: Engine | None = None) -> AliasState | None:
    """The model the alias points at now, or None when nothing was ever promoted."""
    engine = ensure_schema(engine)
    with engine.connect() as conn:
        row = conn.execute(select(model_alias).where(model_alias.c.alias == alias)).mappings().first()
    if row is None:
        return None
    updated = row["updated_at"]
    if updated.tzinfo is None:  # SQLite drops the zone
        updated = updated.replace(tzinfo=dt.timezone.utc)
    return AliasState(row["alias"], row["tag"], row["previous_tag"], updated, row["version"])


def still_at(tag: str, alias: str = PRODUCTION, doing: str = "promoting") -> Callable[[Connection], None]:
    """A check to run inside a production move's transaction: the alias still points at `tag` (a
    refinement promotes only over the champion it refined, a bake rolls back only the model it
    baked: not a model moved in meanwhile)."""
    def check(conn: Connection) -> None:
        now = conn.execute(select(model_alias.c.tag).where(model_alias.c.alias == alias)).scalar()
        if now != tag:
            raise DriftloopError(f"{alias} moved to {now} meanwhile: not {doing}")
    return check


def _move(conn, pointer, alias: str, tag: str, previous_tag: str | None, action: str, reason: str | None, actor: str) -> None:
    """Record the move and set the pointer; `pointer` is its row as read under the lock (None: first move)."""
    now = _now()
    conn.execute(insert(alias_history).values(alias=alias, action=action, tag=tag, previous_tag=previous_tag,
                                              reason=reason, actor=actor, at=now))
    if pointer is None:
        conn.execute(insert(model_alias).values(alias=alias, tag=tag, previous_tag=previous_tag, updated_at=now, version=1))
    else:
        conn.execute(update(model_alias).where(model_alias.c.alias == alias)
                     .values(tag=tag, previous_tag=previous_tag, updated_at=now, version=pointer["version"] + 1))


class _Retry(Exception):
    """The pointer row appeared while this transaction was starting: start again and lock it."""


def _locked(engine: Engine, alias: str, change):
    """Run `change(conn, pointer)` in one transaction that holds the alias's write lock, with the
    pointer row as read under that lock (None before the first promotion).

    Read-then-write must not interleave between two writers (two controllers, a controller and the
    CLI): the transaction starts with a no-op UPDATE of the pointer row, which takes Postgres's row
    lock and SQLite's write lock before anything is read. The very first promotion has no row to
    lock: if a row shows up anyway (another writer just committed it) the transaction starts over,
    and two first promotions racing collide on the primary key, the loser starting over too.
    """
    for attempt in range(5):
        try:
            with engine.begin() as conn:
                locked = conn.execute(update(model_alias).where(model_alias.c.alias == alias)
                                      .values(version=model_alias.c.version)).rowcount == 1
                pointer = conn.execute(select(model_alias).where(model_alias.c.alias == alias)).mappings().first()
                if pointer is not None and not locked:
                    raise _Retry
                return change(conn, pointer)
        except (IntegrityError, _Retry):
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


# In the same transaction as a move: hook(conn, action, new tag, tag it replaces). It may raise to
# cancel the move (a stale leader's fencing token) or write more rows with it (the audit event).
MoveHook = Callable[[Connection, str, str, "str | None"], None]


def promote(tag: str, alias: str = PRODUCTION, reason: str | None = None, actor: str = "user",
            engine: Engine | None = None, hook: MoveHook | None = None) -> AliasState:
    """Point the alias at `tag` (low level: `core.production.promote` checks the model, the
    fencing token and writes the audit trail; use that)."""
    engine = ensure_schema(engine)

    def change(conn, pointer) -> None:
        previous = pointer["tag"] if pointer else None
        if previous == tag:
            raise DriftloopError(f"{tag} is already the {alias} model")
        if hook is not None:
            hook(conn, "promote", tag, previous)
        _move(conn, pointer, alias, tag, previous, "promote", reason, actor)

    _locked(engine, alias, change)
    return current(alias, engine)


def rollback(alias: str = PRODUCTION, to: str | None = None, reason: str | None = None, actor: str = "user",
             engine: Engine | None = None, hook: MoveHook | None = None) -> AliasState:
    """Undo the last promotion (or go to `to`): the pointer returns to the model served before
    (low level: use `core.production.rollback`).

    Rollbacks stack: rolling back twice returns to the model before the one before.
    """
    engine = ensure_schema(engine)

    def change(conn, row) -> None:
        if row is None:
            raise DriftloopError(f"nothing to roll back: no {alias} model has been promoted")
        target = to or row["previous_tag"]
        if target is None:
            raise DriftloopError(f"nothing to roll back to: {row['tag']} was the first {alias} model")
        if target == row["tag"]:
            raise DriftloopError(f"{target} is already the {alias} model")
        # The target's own predecessor, as recorded when the target last became current.
        last = conn.execute(select(alias_history.c.previous_tag)
                            .where(alias_history.c.alias == alias, alias_history.c.tag == target)
                            .order_by(alias_history.c.id.desc()).limit(1)).first()
        below = last.previous_tag if last else None
        if below == row["tag"]:
            below = None
        if hook is not None:
            hook(conn, "rollback", target, row["tag"])
        _move(conn, row, alias, target, below, "rollback", reason or f"rolled back from {row['tag']}", actor)

    _locked(engine, alias, change)
    return current(alias, engine)


def history(alias: str = PRODUCTION, limit: int = 100, engine: Engine | None = None) -> list[dict]:
    """Newest first: every promotion and rollback with its reason."""
    engine = ensure_schema(engine)
    with engine.connect() as conn:
        rows = conn.execute(select(alias_history).where(alias_history.c.alias == alias)
                            .order_by(alias_history.c.id.desc()).limit(limit)).mappings().all()
    return [{**dict(r), "at": r["at"].isoformat()} for r in rows]
