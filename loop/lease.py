"""Leader lease: of several controllers on one state DB, only the lease holder runs jobs.

A lease is one row of the `leases` table: who holds it, until when, and a fencing counter bumped
every time a new holder takes it (a term number: work stamped with an older term is stale). Taking
and renewing are the same atomic UPDATE ... WHERE (holder = me OR nobody holds it OR it expired),
so two contenders can never both succeed; the very first acquisition INSERTs the row, and a
concurrent first INSERT loses on the primary key. Time is the database's: Postgres's `now()` (the
controllers may run on different hosts), and for SQLite the local UTC clock (a SQLite file is only
shared by processes of one machine, so that is the database's clock). Timestamps go through
`UTCDateTime`, so SQLite's zone-less storage and Postgres's timestamptz compare alike.

`LeaderElector` is the thread that keeps trying: a standby tries every ttl/3 and is elected when the
holder's lease expires (it died, or it released it on a clean stop); the leader renews every ttl/3
and steps down by itself when it cannot renew in time (database unreachable), before anybody else
could take over.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Column, Integer, MetaData, String, Table, case, func, insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from core.errors import DriftloopError
from core.statedb import UTCDateTime, create_tables

log = logging.getLogger("driftloop.lease")

metadata = MetaData()

leases = Table(
    "leases", metadata,
    Column("name", String(64), primary_key=True),
    Column("holder", String(255)),  # NULL once released
    Column("acquired_at", UTCDateTime()),  # when the current holder took it (renewals keep it)
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("fencing", Integer, nullable=False),  # +1 on every new holder
)


def _ttl_default() -> float:
    return float(os.environ.get("DRIFTLOOP_LEASE_TTL_S", "15"))


class LeaseSettings(BaseModel):
    """The controllers' leader lease (`--set lease.ttl_s=...`, or DRIFTLOOP_LEASE_TTL_S)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("controller", min_length=1, max_length=64, description="Lease name: controllers sharing it elect one leader.")
    ttl_s: float = Field(default_factory=_ttl_default, ge=0.5, le=3600,
                         description="Seconds a lease lasts without renewal: a dead leader is replaced after at most this long.")

    @property
    def renew_every_s(self) -> float:
        return self.ttl_s / 3


@dataclass
class Lease:
    name: str
    holder: str | None
    acquired_at: dt.datetime | None
    expires_at: dt.datetime
    fencing: int

    def to_json(self) -> dict:
        return {"name": self.name, "holder": self.holder, "fencing": self.fencing,
                "acquired_at": self.acquired_at.isoformat() if self.acquired_at else None,
                "expires_at": self.expires_at.isoformat()}


@dataclass(frozen=True)
class Fence:
    """A leader's term, carried by the work it starts (a refinement child, a bake rollback): a
    production move made with it is refused once another holder took the lease (the fencing token
    moved on), however late the write arrives. `check` runs inside the move's transaction."""

    name: str
    holder: str
    token: int

    def to_arg(self) -> str:
        return json.dumps({"name": self.name, "holder": self.holder, "token": self.token})

    @classmethod
    def from_arg(cls, arg: str) -> "Fence":
        data = json.loads(arg)
        return cls(str(data["name"]), str(data["holder"]), int(data["token"]))

    def check(self, conn: Connection) -> None:
        """Raise DriftloopError unless this fence's holder still holds the lease in the same term."""
        q = select(leases.c.holder, leases.c.fencing).where(leases.c.name == self.name)
        if conn.dialect.name != "sqlite":  # SQLite's write lock (taken by the move) already serialises
            q = q.with_for_update()
        row = conn.execute(q).first()
        if row is None or row.fencing != self.token or row.holder != self.holder:
            now = f"held by {row.holder} with token {row.fencing}" if row is not None else "never taken"
            raise DriftloopError(f"stale leader: lease {self.name!r} is now {now} (this job has token {self.token}); "
                                 "production not moved")


def ensure_schema(engine: Engine) -> None:
    create_tables(metadata, engine)


def default_holder_id() -> str:
    """Unique per process and start: host, pid and a random suffix (a reused pid is a new holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def db_now(conn: Connection) -> dt.datetime:
    """The database's current time, aware UTC."""
    if conn.dialect.name == "sqlite":
        return dt.datetime.now(dt.timezone.utc)
    now = conn.execute(select(func.now())).scalar_one()
    return now.replace(tzinfo=dt.timezone.utc) if now.tzinfo is None else now.astimezone(dt.timezone.utc)


def _row(conn: Connection, name: str) -> Lease | None:
    r = conn.execute(select(leases).where(leases.c.name == name)).first()
    return Lease(r.name, r.holder, r.acquired_at, r.expires_at, r.fencing) if r else None


def try_acquire(engine: Engine, holder: str, ttl_s: float, name: str = "controller") -> Lease | None:
    """Take or renew the lease for `ttl_s` seconds; the lease if `holder` now holds it, else None."""
    c = leases.c
    try:
        with engine.begin() as conn:
            now = db_now(conn)
            expires = now + dt.timedelta(seconds=ttl_s)
            mine = c.holder == holder
            # SET expressions read the row's old values: a renewal keeps acquired_at and the fencing token
            res = conn.execute(update(leases)
                               .where(c.name == name, or_(mine, c.holder.is_(None), c.expires_at <= now))
                               .values(holder=holder, expires_at=expires,
                                       acquired_at=case((mine, c.acquired_at), else_=now),
                                       fencing=case((mine, c.fencing), else_=c.fencing + 1)))
            if res.rowcount == 1:
                return _row(conn, name)
            if conn.execute(select(c.name).where(c.name == name)).first() is not None:
                return None  # held by someone else, not expired
            conn.execute(insert(leases).values(name=name, holder=holder, acquired_at=now, expires_at=expires, fencing=1))
            return Lease(name, holder, now, expires, 1)
    except IntegrityError:
        return None  # another contender inserted the first lease row at the same moment: it holds it


def release(engine: Engine, holder: str, name: str = "controller") -> bool:
    """Give the lease up now (clean stop), so a standby need not wait for it to expire."""
    with engine.begin() as conn:
        now = db_now(conn)
        res = conn.execute(update(leases).where(leases.c.name == name, leases.c.holder == holder)
                           .values(holder=None, expires_at=now))
        return res.rowcount == 1


def current(engine: Engine, name: str = "controller") -> dict | None:
    """The lease row as JSON with `active` (held and not expired), or None if never taken."""
    with engine.connect() as conn:
        lease = _row(conn, name)
        if lease is None:
            return None
        now = db_now(conn)
    return {**lease.to_json(), "active": lease.holder is not None and lease.expires_at > now}


class LeaderElector:
    """A daemon thread that holds the lease while it can and reports every change of role.

    `on_elected(lease)` runs when this process becomes the leader, `on_demoted(reason)` when it stops
    being one (lost to another holder, could not renew in time, or `stop()`); both run on the
    elector's thread, one at a time, and an exception in them is logged, never fatal.
    """

    def __init__(self, engine: Engine, settings: LeaseSettings, holder: str | None = None,
                 on_elected: Callable[[Lease], None] | None = None, on_demoted: Callable[[str], None] | None = None):
        self.engine = engine
        self.settings = settings
        self.holder = holder or default_holder_id()
        self.on_elected = on_elected
        self.on_demoted = on_demoted
        self.lease: Lease | None = None
        self._leader = False
        self._valid_until = 0.0  # monotonic time after which this process must not act as leader unrenewed
        self._stop = threading.Event()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def is_leader(self) -> bool:
        return self._leader and time.monotonic() < self._valid_until

    def _call(self, callback, arg) -> None:
        if callback is None:
            return
        try:
            callback(arg)
        except Exception:  # noqa: BLE001 - the elector must keep running
            log.exception("lease callback %s failed", getattr(callback, "__name__", callback))

    def _demote(self, reason: str) -> None:
        if self._leader:
            self._leader = False
            log.log(logging.INFO if reason == "stopping" else logging.WARNING, "lease %s: %s is no longer the leader: %s",
                    self.settings.name, self.holder, reason)
            self._call(self.on_demoted, reason)

    def step(self) -> bool:
        """One attempt to take or renew the lease; returns whether this process leads now."""
        with self._step_lock:
            started = time.monotonic()
            try:
                lease = try_acquire(self.engine, self.holder, self.settings.ttl_s, self.settings.name)
            except Exception as err:  # noqa: BLE001 - the database may be down for a while
                log.warning("lease %s: could not reach the state DB: %s", self.settings.name, str(err).splitlines()[0])
                if self._leader and time.monotonic() >= self._valid_until:
                    self._demote("could not renew the lease in time")
                return self.is_leader
            if lease is None:
                self._demote("another controller holds the lease")
                return False
            # The database set expiry ≥ started + ttl; stop acting one renewal period before that.
            self._valid_until = started + self.settings.ttl_s - self.settings.renew_every_s
            self.lease = lease
            if not self._leader:
                self._leader = True
                log.info("lease %s: %s is the leader (fencing token %s)", self.settings.name, self.holder, lease.fencing)
                self._call(self.on_elected, lease)
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.settings.renew_every_s):
            self.step()

    def start(self) -> "LeaderElector":
        """Try once right away (a lone controller leads from its first second), then keep trying."""
        ensure_schema(self.engine)
        self.step()
        self._thread = threading.Thread(target=self._run, name="driftloop-lease", daemon=True)
        self._thread.start()
        return self

    def stop(self, release_lease: bool = True) -> None:
        """Stop trying; if leading: `on_demoted("stopping")` first, then hand the lease back."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.ttl_s + 60)
        with self._step_lock:
            was_leader = self._leader
            self._demote("stopping")
            if was_leader and release_lease:
                try:
                    release(self.engine, self.holder, self.settings.name)
                except Exception as err:  # noqa: BLE001 - it expires by itself
                    log.warning("lease %s: could not release: %s", self.settings.name, str(err).splitlines()[0])
