"""The state DB's storage code, the same tests on SQLite and on a real PostgreSQL (tests/pg.py).

Every table driftloop keeps in the state DB: the prediction log, the production alias, the loop's
audit trail, monitor runs, tuning trials, APScheduler's job store and the leader lease. Registered
models themselves live in BentoML's file store (core/registry.py keeps no table).
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import numpy as np
import pytest

UTC = dt.timezone.utc
PLUS2 = dt.timezone(dt.timedelta(hours=2))


def _engine(url):
    from core.statedb import get_engine

    return get_engine(url)


def _aware_utc(value: dt.datetime) -> bool:
    return value.tzinfo is not None and value.utcoffset() == dt.timedelta(0)


# -- prediction log -------------------------------------------------------------------------------

def _predictions(n: int, start: int = 0):
    from core.descriptors import DESCRIPTOR_COLUMNS
    from core.predlog import LoggedPrediction

    return [LoggedPrediction(request_id=f"{start + i:032x}", text=f"text number {start + i} é", label="positive" if i % 2 else "negative",
                             confidence=0.75, probs={"negative": 0.25, "positive": 0.75},
                             descriptors={k: float(i + j) for j, k in enumerate(DESCRIPTOR_COLUMNS)}, truncated=bool(i % 3 == 0),
                             embedding=np.arange(8, dtype=np.float32) + i) for i in range(n)]


def test_prediction_log_batches_feedback_and_windows(state_db_url):
    from sqlalchemy import select

    from core import predlog
    from monitoring import window

    engine = _engine(state_db_url)
    predlog.ensure_schema(engine)
    before = dt.datetime.now(UTC)
    predlog.write_batch(engine, "m:1", _predictions(5))
    predlog.write_batch(engine, "m:2", _predictions(3, start=100), store_text=False)
    assert predlog.count(engine) == 8 and predlog.count(engine, "m:1") == 5 and predlog.count(engine, "m:2") == 3

    with engine.connect() as conn:
        row = {**conn.execute(select(predlog.predictions).where(predlog.predictions.c.request_id == f"{1:032x}")).mappings().one()}
        row.update(conn.execute(select(predlog.TEXT.label("text"), predlog.EMBEDDING.label("embedding")).select_from(predlog.LOGGED)
                                .where(predlog.predictions.c.request_id == f"{1:032x}")).mappings().one())
        hashed = conn.execute(select(predlog.TEXT).select_from(predlog.LOGGED)
                              .where(predlog.predictions.c.model_version == "m:2")).scalars().all()
    assert _aware_utc(row["created_at"]) and before - dt.timedelta(seconds=5) <= row["created_at"] <= dt.datetime.now(UTC)
    assert row["text"] == "text number 1 é" and row["truncated"] is False and row["label"] == "positive"
    assert np.array_equal(np.frombuffer(row["embedding"], dtype=np.float32), np.arange(8, dtype=np.float32) + 1)
    assert hashed == [None, None, None]

    # a row the database refuses rolls the whole batch back (a batch is one transaction); on SQLite a
    # duplicate request id is such a row (on Postgres's partitioned log request_id is indexed, not unique)
    bad = _predictions(1, start=60)[0]
    bad.label = None
    with pytest.raises(Exception):
        predlog.write_batch(engine, "m:1", _predictions(2, start=50) + [bad])
    assert predlog.count(engine) == 8
    if engine.dialect.name == "sqlite":
        with pytest.raises(Exception):
            predlog.write_batch(engine, "m:1", _predictions(2, start=70) + _predictions(1))
        assert predlog.count(engine) == 8

    labels = lambda version: ["negative", "positive"]  # noqa: E731
    rid = f"{0:032x}"
    assert predlog.record_feedback(engine, [(rid, "positive")], labels)[0]["status"] == "recorded"
    assert predlog.record_feedback(engine, [(rid, "positive")], labels)[0]["status"] == "unchanged"  # idempotent
    assert predlog.record_feedback(engine, [(rid, "negative")], labels)[0]["status"] == "replaced"
    with pytest.raises(predlog.FeedbackError) as unknown:
        predlog.record_feedback(engine, [(f"{1:032x}", "positive"), ("f" * 32, "positive")], labels)
    assert unknown.value.status == 404
    with pytest.raises(predlog.FeedbackError) as bad_label:
        predlog.record_feedback(engine, [(f"{1:032x}", "meh")], labels)
    assert bad_label.value.status == 422
    with engine.connect() as conn:
        fb = dict(conn.execute(select(predlog.predictions.c.request_id, predlog.predictions.c.feedback_label)).all())
        at = conn.execute(select(predlog.predictions.c.feedback_at).where(predlog.predictions.c.request_id == rid)).scalar_one()
    assert fb[rid] == "negative" and fb[f"{1:032x}"] is None  # the failed items changed nothing (one transaction)
    assert _aware_utc(at)

    # the monitor's window reader, with time bounds given in another zone: same instants on both engines
    win = window.load(engine, "m:1", ["negative", "positive"], last=100)
    assert win.size == 5 and win.first_id < win.last_id and _aware_utc(win.start)
    assert window.load(engine, "m:1", ["negative", "positive"], since=(before - dt.timedelta(minutes=1)).astimezone(PLUS2)).size == 5
    assert window.load(engine, "m:1", ["negative", "positive"], since=(dt.datetime.now(UTC) + dt.timedelta(minutes=1)).astimezone(PLUS2)).size == 0
    # each row says which runtime computed it; a window is tested against its majority runtime's reference
    assert win.runtime == "torch" and set(win.frame["runtime"]) == {"torch"}
    predlog.write_batch(engine, "m:1", _predictions(6, start=200), runtime="onnx-int8")
    mixed = window.load(engine, "m:1", ["negative", "positive"], last=11)  # 5 torch rows, then 6 int8 rows
    assert mixed.runtime == "onnx-int8" and mixed.size == 6 and mixed.other_runtime_rows == 5 and len(mixed.embeddings) == 6
    assert window.load(engine, "m:1", ["negative", "positive"], last=11, up_to_id=win.last_id).runtime == "torch"
    assert predlog.recent_runtime(engine, "m:1") == "onnx-int8" and predlog.recent_runtime(engine, "m:1", limit=3) == "onnx-int8"
    assert predlog.recent_runtime(engine, "m:2") == "torch" and predlog.recent_runtime(engine, "m:none") is None


def test_a_log_written_before_runtimes_gains_the_column_and_reads_as_torch(state_db_url):
    """A prediction log made by an older driftloop (no `runtime` column) is upgraded in place by the
    first process that opens it; its old rows read as torch, what computed them."""
    from sqlalchemy import Column, MetaData, Table, insert

    from core import predlog
    from core.descriptors import DESCRIPTOR_COLUMNS
    from monitoring import window

    engine = _engine(state_db_url)
    old = MetaData()
    table = Table("predictions", old, *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                        for c in predlog.predictions.columns if c.name != "runtime"))
    old.create_all(engine)
    assert "runtime" not in table.c
    with engine.begin() as conn:
        conn.execute(insert(table), [{"request_id": "old-1", "created_at": dt.datetime.now(UTC), "model_version": "m:1", "text": "t",
                                      "text_sha256": "0" * 64, "label": "positive", "confidence": 0.9,
                                      "probs": '{"negative": 0.1, "positive": 0.9}', **dict.fromkeys(DESCRIPTOR_COLUMNS, 1.0),
                                      "truncated": False, "embedding": np.zeros(8, dtype=np.float32).tobytes()}])
    predlog.ensure_schema(engine)
    predlog.ensure_schema(engine)  # idempotent
    predlog.write_batch(engine, "m:1", _predictions(1, start=300), runtime="onnx")
    assert [r.runtime for r in predlog.window_rows(engine, "m:1", last=10)] == [None, "onnx"]
    old_rows = window.load(engine, "m:1", ["negative", "positive"], last=1, up_to_id=1)
    assert old_rows.runtime == "torch" and old_rows.frame["runtime"].tolist() == ["torch"]
    tie = window.load(engine, "m:1", ["negative", "positive"], last=10)  # one row each: the newer runtime's
    assert tie.runtime == "onnx" and tie.size == 1 and tie.other_runtime_rows == 1


def test_sqlite_commit_policy_is_a_setting(tmp_path, monkeypatch):
    """`normal` by default (a commit survives kill -9 of the writer: WAL), `full` (an fsync per commit:
    survives power loss) when asked; anything else is refused with one line."""
    import subprocess
    import sys

    from core.errors import DriftloopError
    from core.statedb import dispose_engine, get_engine

    def pragma(url: str) -> int:
        with get_engine(url).connect() as conn:
            return conn.exec_driver_sql("PRAGMA synchronous").scalar_one()

    url = f"sqlite:///{tmp_path / 'a.db'}"
    monkeypatch.delenv("DRIFTLOOP_DB_SYNCHRONOUS", raising=False)
    assert pragma(url) == 1  # NORMAL
    dispose_engine(url)
    monkeypatch.setenv("DRIFTLOOP_DB_SYNCHRONOUS", "FULL")
    assert pragma(url) == 2
    dispose_engine(url)
    monkeypatch.setenv("DRIFTLOOP_DB_SYNCHRONOUS", "sometimes")
    with pytest.raises(DriftloopError, match="DRIFTLOOP_DB_SYNCHRONOUS"):
        get_engine(url)
    # rows committed by a writer killed right after its commits are all there. A kill -9 cannot tell
    # `normal` from `off` (the operating system keeps the written pages either way; only a power loss
    # or an OS crash can): what this shows is that the writer really ran with the default, `normal`,
    # in WAL mode (printed by the writer itself), and that its acknowledged commits survive its death.
    monkeypatch.delenv("DRIFTLOOP_DB_SYNCHRONOUS")
    code = ("import os, signal; from core import predlog; from core.statedb import get_engine; "
            f"from tests.test_storage_backends import _predictions; e = get_engine({url!r}); predlog.ensure_schema(e); "
            "c = e.connect(); print(c.exec_driver_sql('PRAGMA synchronous').scalar(), c.exec_driver_sql('PRAGMA journal_mode').scalar(), "
            "flush=True); c.close(); "
            "[predlog.write_batch(e, 'm:k', _predictions(10, start=1000 + 10 * i)) for i in range(20)]; "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert proc.stdout.split() == ["1", "wal"], proc.stdout  # NORMAL, WAL: the writer's own settings
    from core import predlog

    assert predlog.count(get_engine(url), "m:k") == 200


# -- production alias -----------------------------------------------------------------------------

def test_alias_promote_rollback_stacking_and_history(state_db_url):
    from core import alias
    from core.errors import DriftloopError

    engine = _engine(state_db_url)
    assert alias.current(engine=engine) is None
    with pytest.raises(DriftloopError, match="nothing to roll back"):
        alias.rollback(engine=engine)
    for tag in ("m:1", "m:2", "m:3"):
        state = alias.promote(tag, reason=f"why {tag}", engine=engine)
    assert (state.tag, state.previous_tag, state.version) == ("m:3", "m:2", 3) and _aware_utc(state.updated_at)
    with pytest.raises(DriftloopError, match="already"):
        alias.promote("m:3", engine=engine)
    assert alias.rollback(engine=engine).tag == "m:2"
    back = alias.rollback(engine=engine)  # rollbacks stack
    assert (back.tag, back.previous_tag) == ("m:1", None)
    with pytest.raises(DriftloopError, match="first"):
        alias.rollback(engine=engine)
    assert alias.rollback(to="m:3", engine=engine).tag == "m:3"
    hist = alias.history(engine=engine)
    assert [(h["action"], h["tag"]) for h in hist] == [("rollback", "m:3"), ("rollback", "m:1"), ("rollback", "m:2"),
                                                        ("promote", "m:3"), ("promote", "m:2"), ("promote", "m:1")]
    assert hist[-1]["reason"] == "why m:1" and dt.datetime.fromisoformat(hist[0]["at"]).utcoffset() == dt.timedelta(0)


def test_concurrent_promotions_leave_a_consistent_pointer(state_db_url):
    """Two writers promoting at once: every move is recorded on top of the one before (no lost update)."""
    from core import alias

    engine = _engine(state_db_url)
    alias.promote("base:0", engine=engine)
    start = threading.Barrier(2)
    errors = []

    def writer(name: str) -> None:
        try:
            start.wait()
            for i in range(12):
                alias.promote(f"{name}:{i}", actor=name, engine=engine)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    hist = alias.history(limit=100, engine=engine)[::-1]  # oldest first
    assert len(hist) == 25
    for before, after in zip(hist, hist[1:]):
        assert after["previous_tag"] == before["tag"], (before, after)  # each move saw the one before it
    state = alias.current(engine=engine)
    assert state.version == 25 and state.tag == hist[-1]["tag"] and state.previous_tag == hist[-2]["tag"]


def test_first_promotions_racing_on_an_empty_table_both_land(state_db_url):
    from core import alias

    engine = _engine(state_db_url)
    alias.ensure_schema(engine)
    start = threading.Barrier(4)
    errors = []

    def first(tag: str) -> None:
        try:
            start.wait()
            alias.promote(tag, engine=engine)
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=first, args=(f"m:{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    hist = alias.history(engine=engine)[::-1]
    assert len(hist) == 4 and hist[0]["previous_tag"] is None
    assert all(b["previous_tag"] == a["tag"] for a, b in zip(hist, hist[1:]))
    assert alias.current(engine=engine).version == 4


# -- audit trail, monitor runs, tuning trials ------------------------------------------------------

def test_audit_trail_order_details_and_time_filters(state_db_url):
    from core import audit

    engine = _engine(state_db_url)
    first = audit.record(engine, "policy", "m:1", action="skip", reason="x" * 3000, signals={"n": 1})
    second = audit.record(engine, "retrain_started", "m:1", trigger="drift")
    assert second > first
    hist = audit.history(engine)
    assert [e["kind"] for e in hist] == ["retrain_started", "policy"] and hist[1]["signals"] == {"n": 1}
    assert len(hist[1]["reason"]) == 3000
    assert audit.last(engine, "retrain_started")["trigger"] == "drift"
    at = dt.datetime.fromisoformat(hist[0]["at"])
    assert _aware_utc(at)
    assert (dt.datetime.now(UTC) - at).total_seconds() < 60  # aware arithmetic works on both engines
    hour_ago = (dt.datetime.now(UTC) - dt.timedelta(hours=1)).astimezone(PLUS2)
    assert audit.count_since(engine, "retrain_started", hour_ago) == 1
    assert audit.count_since(engine, "retrain_started", dt.datetime.now(UTC) + dt.timedelta(minutes=5)) == 0
    assert audit.history(engine, kinds=("policy",))[0]["id"] == first


def _pass(version: str, drift: bool | None, status: str = "ok", start: dt.datetime | None = None):
    from monitoring.analysis import PassResult, TestResult

    start = start or dt.datetime(2026, 5, 1, 12, 0, tzinfo=PLUS2)
    return PassResult(model_version=version, status=status, drift=drift, window_size=300, window_first_id=1, window_last_id=300,
                      window_start=start, window_end=start + dt.timedelta(minutes=5), alpha=0.05,
                      tests=[TestResult("length_chars", "descriptor", "ks", 0.01, 0.01, 0.025, bool(drift), 500, 300)],
                      quality={"labelled": 10, "realized_accuracy": float("nan"), "estimated_accuracy": 0.9}, duration_s=0.5)


def test_monitor_runs_store(state_db_url):
    from monitoring import store

    engine = _engine(state_db_url)
    store.ensure_schema(engine)
    ids = [store.save(engine, _pass("m:1", d)) for d in (False, True, True)]
    store.save(engine, _pass("m:1", None, status="insufficient"))
    store.save(engine, _pass("m:2", False))
    store.set_report_path(engine, ids[-1], "/tmp/monitor-x.html")
    latest = store.latest(engine)
    assert latest["model_version"] == "m:2" and latest["run_id"] > ids[-1]
    assert _aware_utc(dt.datetime.fromisoformat(latest["finished_at"]))
    by_version = store.latest(engine, "m:1")
    assert by_version["status"] == "insufficient"
    assert [r["drift"] for r in store.recent(engine, model_version="m:1")] == [None, True, True, False]
    assert store.consecutive_drift(engine, "m:1") == 2 and store.consecutive_drift(engine, "m:2") == 0
    assert [r["report_path"] for r in store.recent(engine, limit=5) if r["run_id"] == ids[-1]] == ["/tmp/monitor-x.html"]

    from sqlalchemy import select

    with engine.connect() as conn:
        row = conn.execute(select(store.monitor_runs).where(store.monitor_runs.c.id == ids[0])).mappings().one()
    assert row["window_start"] == dt.datetime(2026, 5, 1, 10, 0, tzinfo=UTC)  # the same instant, read back as UTC
    assert row["realized_accuracy"] is None and row["estimated_accuracy"] == 0.9 and row["drift"] is False


def test_tuning_trials_table(state_db_url):
    from sqlalchemy import insert, select

    from core.statedb import create_tables
    from finetune import tune

    engine = _engine(state_db_url)
    create_tables(tune.metadata, engine)
    create_tables(tune.metadata, engine)  # idempotent
    with engine.begin() as conn:
        conn.execute(insert(tune.tune_trials).values(study="s" * 12, trial=1, params='{"lr": 1e-4}', config="{}", status="ok",
                                                     objective=0.5, seconds=1.5, at=dt.datetime.now(UTC)))
        conn.execute(insert(tune.tune_trials).values(study="s" * 12, trial=2, params="{}", config="{}", status="failed",
                                                     error="boom", at=dt.datetime.now(PLUS2)))
    with engine.connect() as conn:
        rows = conn.execute(select(tune.tune_trials).order_by(tune.tune_trials.c.trial)).mappings().all()
    assert [r["status"] for r in rows] == ["ok", "failed"] and rows[0]["id"] < rows[1]["id"]
    assert all(_aware_utc(r["at"]) for r in rows) and abs((rows[1]["at"] - rows[0]["at"]).total_seconds()) < 60


# -- the controller's job store -----------------------------------------------------------------

def test_scheduler_jobs_persist_in_the_state_db_across_restarts(state_db_url):
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    from loop import controller

    settings = controller.ControllerSettings(monitor_interval_s=3600)
    first = controller.build_scheduler(settings)  # jobs in DRIFTLOOP_DB_URL, i.e. this test's DB
    first.start(paused=True)
    next_run = first.get_job("monitor").next_run_time
    first.shutdown(wait=True)

    again = BackgroundScheduler(jobstores={"default": SQLAlchemyJobStore(engine=_engine(state_db_url), tablename=controller.JOB_TABLE)},
                                timezone="UTC")
    again.start(paused=True)
    try:
        jobs = {j.id: j for j in again.get_jobs()}
        assert sorted(jobs) == ["labels", "monitor", "retention"]
        assert jobs["monitor"].func is controller.monitor_job and jobs["monitor"].kwargs["monitor"] == settings.monitor.model_dump()
        assert jobs["monitor"].next_run_time == next_run
        assert jobs["retention"].kwargs["retention_config"] == settings.retention.model_dump()
    finally:
        again.shutdown(wait=True)
    # a restarted controller replaces its jobs instead of adding second ones
    third = controller.build_scheduler(settings)
    third.start(paused=True)
    try:
        assert sorted(j.id for j in third.get_jobs()) == ["labels", "monitor", "retention"]
    finally:
        third.shutdown(wait=True)


# -- leader lease ---------------------------------------------------------------------------------

def test_lease_acquire_renew_release_and_fencing(state_db_url):
    from loop import lease

    engine = _engine(state_db_url)
    lease.ensure_schema(engine)
    assert lease.current(engine) is None
    a = lease.try_acquire(engine, "a", ttl_s=30)
    assert a is not None and a.holder == "a" and a.fencing == 1 and _aware_utc(a.expires_at)
    assert 25 < (a.expires_at - dt.datetime.now(UTC)).total_seconds() <= 31
    assert lease.try_acquire(engine, "b", ttl_s=30) is None  # held
    renewed = lease.try_acquire(engine, "a", ttl_s=60)
    assert renewed.fencing == 1 and renewed.acquired_at == a.acquired_at and renewed.expires_at > a.expires_at
    state = lease.current(engine)
    assert state["holder"] == "a" and state["active"] is True
    assert lease.release(engine, "b") is False  # only the holder can release
    assert lease.release(engine, "a") is True
    assert lease.current(engine)["active"] is False
    b = lease.try_acquire(engine, "b", ttl_s=30)
    assert b is not None and b.fencing == 2  # a new holder, a new term
    assert lease.try_acquire(engine, "a", ttl_s=30) is None
    assert lease.try_acquire(engine, "b", ttl_s=30, name="other").fencing == 1  # leases are independent by name


def test_an_expired_lease_goes_to_exactly_one_contender(state_db_url):
    from loop import lease

    engine = _engine(state_db_url)
    lease.ensure_schema(engine)
    start = threading.Barrier(6)
    won: list = []

    def contend(name: str) -> None:
        start.wait()
        got = lease.try_acquire(engine, name, ttl_s=2)
        if got is not None:
            won.append(got)

    def race(prefix: str) -> list:
        won.clear()
        threads = [threading.Thread(target=contend, args=(f"{prefix}{i}",)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return list(won)

    first = race("first-")  # nobody held it: the INSERT race
    assert len(first) == 1 and first[0].fencing == 1
    deadline = time.monotonic() + 10
    while lease.current(engine)["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not lease.current(engine)["active"]
    second = race("second-")  # expired: the UPDATE race (new contenders: a new term)
    assert len(second) == 1 and second[0].fencing == 2


def test_leader_elector_one_leader_handover_on_stop_and_on_death(state_db_url):
    from loop import lease

    engine = _engine(state_db_url)
    settings = lease.LeaseSettings(ttl_s=1.5)
    events: list[tuple[str, str]] = []

    def elector(name: str) -> lease.LeaderElector:
        return lease.LeaderElector(engine, settings, holder=name, on_elected=lambda held: events.append(("elected", name)),
                                   on_demoted=lambda why: events.append(("demoted", name)))

    def wait_for(predicate, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, events
            time.sleep(0.05)

    a = elector("a").start()
    b = elector("b").start()
    c = None
    try:
        assert a.is_leader and not b.is_leader and events == [("elected", "a")]
        time.sleep(settings.ttl_s * 1.5)  # several renewal periods: the leader keeps the lease
        assert a.is_leader and not b.is_leader and events == [("elected", "a")]

        a.stop()  # clean stop: demoted first, then the lease is released
        assert events[1] == ("demoted", "a")
        wait_for(lambda: b.is_leader)
        assert events[2] == ("elected", "b") and b.lease.fencing == 2

        c = elector("c").start()
        assert not c.is_leader
        b.stop(release_lease=False)  # like a crash: the lease is left to expire
        wait_for(lambda: c.is_leader)
        assert c.lease.fencing == 3 and [e for e in events if e[0] == "elected"] == [("elected", "a"), ("elected", "b"), ("elected", "c")]

        # someone else takes the lease (here by force): the leader steps down at its next renewal
        from sqlalchemy import update

        with engine.begin() as conn:
            conn.execute(update(lease.leases).values(holder="intruder", expires_at=dt.datetime.now(UTC) + dt.timedelta(minutes=5)))
        assert c.step() is False and not c.is_leader and events[-1] == ("demoted", "c")
    finally:
        for e in (a, b, c):
            if e is not None:
                e.stop()


def test_a_locked_postgres_row_is_an_error_not_a_hang(postgres_server, monkeypatch):
    """The engine's lock timeout: a writer blocked by another transaction's lock fails, it does not wait forever."""
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError

    from core import alias, statedb

    url = postgres_server.create_database()
    engine = statedb.get_engine(url, lock_timeout_s=0.3)  # the short timeout, as the service asks for its writes
    holder = statedb._postgres_engine(statedb.normalize_url(url), statedb.PG_LOCK_TIMEOUT_MS)
    try:
        alias.promote("m:1", engine=engine)
        with holder.connect() as conn, conn.begin():
            conn.execute(text("select * from model_alias for update"))  # held until this block ends
            started = time.monotonic()
            with pytest.raises(OperationalError, match="lock timeout"):
                alias.promote("m:2", engine=engine)
            assert time.monotonic() - started < 10
        assert alias.promote("m:2", engine=engine).tag == "m:2"  # and works once the lock is gone
    finally:
        statedb.dispose_engine(url)
        holder.dispose()


def test_a_plain_postgres_url_uses_psycopg_3(postgres_server):
    from sqlalchemy import text

    from core.statedb import dispose_engine, get_engine

    url = postgres_server.create_database().replace("postgresql+psycopg://", "postgresql://")
    engine = get_engine(url)
    try:
        assert engine.dialect.driver == "psycopg"
        with engine.connect() as conn:
            assert conn.execute(text("show timezone")).scalar_one() == "UTC"
            assert conn.execute(text("show lock_timeout")).scalar_one() == "10s"
    finally:
        dispose_engine(url)


def test_estimation_error_is_measured_on_the_newest_labelled_predictions(state_db_url):
    from core import predlog
    from core.statedb import get_engine
    from tests.test_loop import _log_labelled

    engine = get_engine(state_db_url)
    predlog.ensure_schema(engine)
    assert predlog.estimation_error(engine, "m:1") == (None, 0)
    # confidence 0.9 on every row: the first 100 rows all wrong, the newest 100 all right
    _log_labelled(engine, "m:1", [("pos", "neg")] * 100)
    _log_labelled(engine, "m:1", [("pos", "pos")] * 100)
    error, n = predlog.estimation_error(engine, "m:1")
    assert n == 200 and abs(error - (0.9 - 0.5)) < 1e-9
    error, n = predlog.estimation_error(engine, "m:1", limit=100)
    assert n == 100 and abs(error - (0.9 - 1.0)) < 1e-9
    assert predlog.estimation_error(engine, "m:2") == (None, 0)
