"""Retention of the prediction log (core/retention.py, loop/upkeep.py), on SQLite and on Postgres.

Rows older than raw_days lose their text and embedding (their rows in prediction_raw) and keep the
rest; rows older than days go
(on Postgres whole day partitions are dropped); rows a refinement, a bake or a reference profile
still needs stay whole until the need passes; SQLite gives the space back; a hash-only log never
leaves the bake (and with it the policy) waiting for texts it will never see.
"""

from __future__ import annotations

import datetime as dt
import types

import numpy as np
import pytest
from sqlalchemy import select

UTC = dt.timezone.utc
NOW = dt.datetime.now(UTC)  # promotions are stamped with the real time: rows "after" one are written after it


def _rows(n: int, start: int):
    from core.descriptors import DESCRIPTOR_COLUMNS
    from core.predlog import LoggedPrediction

    return [LoggedPrediction(request_id=f"{start + i:032x}", text=f"customer text {start + i}", label="positive",
                             confidence=0.9, probs={"negative": 0.1, "positive": 0.9},
                             descriptors=dict.fromkeys(DESCRIPTOR_COLUMNS, 1.0), truncated=False,
                             embedding=np.ones(64, dtype=np.float32)) for i in range(n)]


def write_days(engine, version: str, ages_days: list[float], per_day: int = 20, store_text: bool = True,
               base: dt.datetime | None = None) -> dict[float, list[int]]:
    """`per_day` rows at each age (days before NOW), oldest first; half of them labelled. Returns
    the ids written at each age. On Postgres the day partitions are made as the controller would
    have made them on those days."""
    from core import predlog

    predlog.ensure_schema(engine)
    if engine.dialect.name == "postgresql":
        from core import partitions

        for age in ages_days:
            partitions.ensure_days(engine, today=(NOW - dt.timedelta(days=age)).date(), ahead=0)
    ids = {}
    for age in sorted(ages_days, reverse=True):
        first = predlog.max_id(engine) + 1
        start = first * 1000
        rows = _rows(per_day, start)
        predlog.write_batch(engine, version, rows, at=(base or NOW) - dt.timedelta(days=age), store_text=store_text)
        predlog.record_feedback(engine, [(r.request_id, "positive") for r in rows[::2]], lambda v: ["negative", "positive"])
        ids[age] = list(range(first, predlog.max_id(engine) + 1))
    return ids


def rows_by_id(engine) -> dict[int, dict]:
    """Every logged row with its text and embedding where still kept (core/predlog.py: prediction_raw)."""
    from core.predlog import EMBEDDING, LOGGED, TEXT, predictions

    columns = [col for col in predictions.c if col.name not in ("text", "embedding")]
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(select(*columns, TEXT.label("text"), EMBEDDING.label("embedding"))
                                                        .select_from(LOGGED)).mappings()}


def test_raw_content_goes_after_raw_days_and_rows_after_days(state_db_url):
    from core import retention
    from core.descriptors import DESCRIPTOR_COLUMNS
    from core.statedb import get_engine

    engine = get_engine(state_db_url)
    ids = write_days(engine, "m:1", [40, 20, 5, 1])
    config = retention.RetentionConfig(raw_days=3, days=30, batch_rows=7, pause_s=0)
    result = retention.run(engine, config, now=NOW)
    rows = rows_by_id(engine)
    assert not set(ids[40]) & set(rows), "rows older than days are deleted"
    for age in (20, 5):
        for i in ids[age]:
            r = rows[i]
            assert r["text"] is None and r["embedding"] is None, "older than raw_days: no text, no embedding"
            assert r["label"] == "positive" and r["confidence"] == pytest.approx(0.9) and r["text_sha256"]
            assert r["probs"] and all(r[k] == 1.0 for k in DESCRIPTOR_COLUMNS), "descriptors kept"
        assert [rows[i]["feedback_label"] for i in ids[age]][::2] == ["positive"] * 10, "feedback kept"
    assert all(rows[i]["text"] and rows[i]["embedding"] for i in ids[1]), "newer rows untouched"
    assert result.compacted == 40 and result.finished
    if engine.dialect.name == "postgresql":  # the day's partition (and the empty ones made around it) dropped whole
        assert f"predictions_p{(NOW - dt.timedelta(days=40)).date():%Y%m%d}" in result.partitions_dropped and result.deleted == 0
    else:
        assert result.deleted == 20
    again = retention.run(engine, config, now=NOW)  # idempotent
    assert (again.compacted, again.deleted, again.partitions_dropped) == (0, 0, [])
    stats = retention.stats(engine, config, now=NOW)
    assert stats["pending_compaction"] == 0
    assert dt.datetime.fromisoformat(stats["oldest_raw_at"]) == NOW - dt.timedelta(days=1)
    assert dt.datetime.fromisoformat(stats["oldest_at"]) == NOW - dt.timedelta(days=20)


def test_work_goes_in_batches_of_batch_rows(tmp_path):
    """Each delete and each compaction is its own transaction of at most batch_rows rows: the
    longest a service write waits behind retention (measured under load in bench/logscale.py)."""
    from sqlalchemy import event

    from core import retention
    from core.statedb import get_engine

    engine = get_engine(f"sqlite:///{tmp_path / 's.db'}")
    write_days(engine, "m:1", [40, 20], per_day=50)
    writes = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cur, statement, params, ctx, many: writes.append(statement) if statement.startswith(("DELETE", "UPDATE")) else None)
    retention.run(engine, retention.RetentionConfig(raw_days=3, days=30, batch_rows=15, pause_s=0), now=NOW)
    deletes = [s for s in writes if s.startswith("DELETE FROM predictions ")]
    raw_deletes = [s for s in writes if s.startswith("DELETE FROM prediction_raw ")]
    # 50 rows each: 15 + 15 + 15 + 5; the old rows go with their raw content, the 20-day-old rows keep the rest
    assert len(deletes) == 4 and len(raw_deletes) == 4 + 4
    assert not [s for s in writes if s.startswith("UPDATE")], "compaction deletes raw content, it does not rewrite rows"


def test_held_rows_stay_whole_until_the_hold_ends(state_db_url):
    from core import retention
    from core.statedb import get_engine

    engine = get_engine(state_db_url)
    ids = write_days(engine, "m:1", [10, 5])
    write_days(engine, "m:other", [5])
    config = retention.RetentionConfig(raw_days=3, days=30, pause_s=0)
    hold = retention.hold(engine, "m:1", ids[5][0], "a refinement reads these")
    expired = retention.hold(engine, "m:1", ids[10][0], "owner died", ttl_s=-1)
    result = retention.run(engine, config, now=NOW)
    rows = rows_by_id(engine)
    assert all(rows[i]["text"] for i in ids[5]), "held rows keep their text"
    assert all(rows[i]["text"] is None for i in ids[10]), "an expired hold holds nothing"
    assert any("a refinement reads these" in line for line in result.kept)
    assert [h.reason for h in retention.active_holds(engine)] == ["a refinement reads these"]
    assert expired not in [h for h in retention.active_holds(engine)]
    retention.release(engine, hold)
    retention.run(engine, config, now=NOW)
    assert all(rows_by_id(engine)[i]["text"] is None for i in ids[5])


def test_a_running_refinement_holds_its_fresh_rows_and_reference(db_url, monkeypatch):
    """refine.run holds the champion's rows from since_id on while it runs (fresh labelled rows,
    the newest texts it profiles), and releases the hold when it ends, failed or not."""
    from core import production, retention
    from core.errors import DriftloopError
    from core.statedb import get_engine
    from loop import refine
    from loop.refine_config import RefineConfig

    engine = get_engine(db_url)
    ids = write_days(engine, "m:champ", [6, 5])
    production.promote("m:champ", reason="test", actor="test", engine=engine, verify=False)
    seen = {}

    def body(engine, config, *, since_id, **_):
        seen["result"] = retention.run(engine, retention.RetentionConfig(raw_days=1, days=30, pause_s=0), now=NOW)
        seen["rows"] = rows_by_id(engine)
        raise DriftloopError("refinement failed halfway")

    monkeypatch.setattr(refine, "_run", body)
    with pytest.raises(DriftloopError, match="halfway"):
        refine.run(engine, RefineConfig(), trigger="drift", since_id=ids[5][0])
    assert all(seen["rows"][i]["text"] and seen["rows"][i]["embedding"] for i in ids[5]), "fresh rows kept whole"
    assert all(seen["rows"][i]["text"] is None for i in ids[6]), "rows before since_id are not held"
    assert retention.active_holds(engine) == [], "released when the refinement ended"


def test_an_unfinished_bake_holds_the_new_champions_rows(db_url):
    from core import audit, production, retention
    from core.statedb import get_engine
    from loop import upkeep

    engine = get_engine(db_url)
    write_days(engine, "m:old", [9])
    production.promote("m:old", reason="first", actor="test", engine=engine, verify=False)
    production.promote("m:new", reason="gate passed", actor="test", engine=engine, verify=False)
    ids = write_days(engine, "m:new", [-0.01], base=dt.datetime.now(UTC))  # served after the promotion (real time: a long suite)
    config = retention.RetentionConfig(raw_days=0.1, days=30, pause_s=0)
    later = dt.datetime.now(UTC) + dt.timedelta(days=1)
    upkeep.run_retention(engine, config, now=later)
    assert all(rows_by_id(engine)[i]["text"] for i in ids[-0.01]), "bake items kept"
    assert all(r["text"] is None for r in rows_by_id(engine).values() if r["model_version"] == "m:old")
    audit.record(engine, "bake_passed", "m:new", previous="m:old")
    summary = upkeep.run_retention(engine, config, now=later)
    assert summary["compacted"] == len(ids[-0.01]) and all(rows_by_id(engine)[i]["text"] is None for i in ids[-0.01])


def test_sqlite_returns_freed_space_to_the_file_system(tmp_path):
    from core import retention
    from core.statedb import get_engine

    engine = get_engine(f"sqlite:///{tmp_path / 's.db'}")
    write_days(engine, "m:1", [40, 1], per_day=2000)
    path = tmp_path / "s.db"
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    before = path.stat().st_size
    result = retention.run(engine, retention.RetentionConfig(raw_days=3, days=30, pause_s=0), now=NOW)
    after = path.stat().st_size  # the run's own (passive) checkpoint moved the shrunken pages in
    assert result.deleted == 2000 and result.vacuumed_pages > 0
    assert after < 0.6 * before, (before, after)


def test_compaction_alone_gives_sqlite_its_space_back(tmp_path):
    """Text and embedding (384 floats, as served) are most of a row: deleting them after raw_days
    must shrink the file, not leave shrunken rows in pages SQLite never merges (what setting the
    columns to NULL did: core/predlog.py)."""
    from core import retention
    from core.descriptors import DESCRIPTOR_COLUMNS
    from core.predlog import LoggedPrediction, ensure_schema, write_batch
    from core.statedb import get_engine

    engine = get_engine(f"sqlite:///{tmp_path / 's.db'}")
    ensure_schema(engine)
    rows = [LoggedPrediction(request_id=f"{i:032x}", text=f"a customer's sentence, number {i}", label="positive", confidence=0.9,
                             probs={"negative": 0.1, "positive": 0.9}, descriptors=dict.fromkeys(DESCRIPTOR_COLUMNS, 1.0),
                             truncated=False, embedding=np.ones(384, dtype=np.float32)) for i in range(3000)]
    for first in range(0, 3000, 500):
        write_batch(engine, "m:1", rows[first:first + 500], at=NOW - dt.timedelta(days=5))
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    before = (tmp_path / "s.db").stat().st_size
    result = retention.run(engine, retention.RetentionConfig(raw_days=3, days=30, pause_s=0), now=NOW)
    after = (tmp_path / "s.db").stat().st_size
    assert result.compacted == 3000 and result.deleted == 0 and result.vacuumed_pages > 0
    assert after < 0.4 * before, (before, after)


def test_one_vacuum_step_returns_as_many_pages_as_asked(tmp_path):
    """A step frees `vacuum_pages` pages, not one: stepped once (as Python's sqlite3 runs a pragma
    without result columns), a run paused pause_s after every page and fell behind by days."""
    from core import retention
    from core.statedb import get_engine

    engine = get_engine(f"sqlite:///{tmp_path / 's.db'}")
    write_days(engine, "m:1", [40], per_day=2000)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM prediction_raw")
    with engine.connect() as conn:
        free = int(conn.exec_driver_sql("PRAGMA freelist_count").scalar())
        assert free > 100
        assert retention.vacuum_step(conn, 100) == 100
        assert int(conn.exec_driver_sql("PRAGMA freelist_count").scalar()) == free - 100


def test_a_log_from_before_the_raw_table_is_read_and_compacted_in_place(tmp_path):
    """Rows an older driftloop logged keep their text and embedding in the row's own columns: the
    reads still see them, and retention strips them after raw_days (it cannot free their space)."""
    from sqlalchemy import update

    from core import predlog, retention
    from core.statedb import get_engine

    engine = get_engine(f"sqlite:///{tmp_path / 's.db'}")
    ids = write_days(engine, "m:1", [5, 1])
    with engine.begin() as conn:  # move the content into the row, as the older schema kept it
        for i, text, embedding in conn.execute(select(predlog.raw.c.id, predlog.raw.c.text, predlog.raw.c.embedding)).all():
            conn.execute(update(predlog.predictions).where(predlog.predictions.c.id == i).values(text=text, embedding=embedding))
        conn.execute(predlog.raw.delete())
    assert len(predlog.recent_texts(engine, "m:1", None, 100)) == 40, "legacy texts are read"
    assert retention.stats(engine, retention.RetentionConfig(raw_days=3), now=NOW)["pending_compaction"] == 20
    result = retention.run(engine, retention.RetentionConfig(raw_days=3, days=30, pause_s=0), now=NOW)
    rows = rows_by_id(engine)
    assert result.compacted == 20 and all(rows[i]["text"] is None and rows[i]["embedding"] is None for i in ids[5])
    assert all(rows[i]["text"] and rows[i]["embedding"] for i in ids[1])


def test_postgres_retention_drops_day_partitions_and_deletes_strays(postgres_server):
    """Whole days go as partitions; rows that fell into DEFAULT (a day nobody made a partition for)
    are deleted row by row; a held partition stays."""
    from sqlalchemy import text

    from core import partitions, predlog, retention
    from core.statedb import dispose_engine, get_engine

    url = postgres_server.create_database()
    engine = get_engine(url)
    try:
        ids = write_days(engine, "m:1", [50, 45, 2])
        stray_at = NOW - dt.timedelta(days=60)
        predlog.write_batch(engine, "m:stray", _rows(5, 10**9), at=stray_at)  # no partition for that day: DEFAULT
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM predictions_default")).scalar() == 5
        hold = retention.hold(engine, "m:1", ids[45][0], "bake")
        result = retention.run(engine, retention.RetentionConfig(raw_days=10, days=30, pause_s=0), now=NOW)
        day50, day45 = (partitions.day_partition((NOW - dt.timedelta(days=d)).date()) for d in (50, 45))
        assert day50 in result.partitions_dropped and day45 not in result.partitions_dropped
        assert result.deleted == 5
        assert any(day45 in line and "bake" in line for line in result.kept)
        retention.release(engine, hold)
        result = retention.run(engine, retention.RetentionConfig(raw_days=10, days=30, pause_s=0), now=NOW)
        assert day45 in result.partitions_dropped
        assert sorted(rows_by_id(engine)) == ids[2]
        with engine.connect() as conn:
            days = partitions.partitions(conn)
        assert (NOW + dt.timedelta(days=partitions.DAYS_AHEAD)).date() in days.values(), "a week of partitions ahead"
    finally:
        dispose_engine(url)


def test_a_hash_only_log_never_leaves_the_bake_or_the_policy_waiting(db_url):
    """With store_text=False the previous champion cannot re-score the new champion's items: the
    bake decides at the first pass (recorded, with why), /status says so before, and the policy
    counts no labels a refinement could train on (it would refuse them), so it never starts one."""
    from starlette.testclient import TestClient

    from core import audit, predlog, production
    from core.statedb import get_engine
    from loop import bake, controller
    from loop.policy import PolicyConfig
    from monitoring import store

    engine = get_engine(db_url)
    write_days(engine, "m:old", [3], store_text=False)
    production.promote("m:old", reason="first", actor="test", engine=engine, verify=False)
    production.promote("m:new", reason="manual", actor="test", engine=engine, verify=False)
    write_days(engine, "m:new", [-0.01], per_day=300, store_text=False, base=dt.datetime.now(UTC))  # after the promotion

    store.ensure_schema(engine)
    app = controller.build_app(engine, controller.MetricsRefresher(engine))
    with TestClient(app) as client:
        status = client.get("/status").json()
    assert status["bake"]["state"].startswith("skipping: hash-only") and status["bake"]["labelled_items_with_text"] == 0
    assert status["log"]["rows"] == 320 and status["log"]["pending_compaction"] >= 0

    assert predlog.labelled_count(engine, "m:new", with_text=True) == 0 and predlog.labelled_count(engine, "m:new") == 150
    verdict = types.SimpleNamespace(model_version="m:new")
    assert bake.bake_check(engine, verdict, PolicyConfig()) == "bake_passed"
    event = audit.last(engine, "bake_passed")
    assert event["model_version"] == "m:new" and "hash" in event["skipped"]
    assert bake.in_bake(engine, "m:new") is None and bake.bake_status(engine, "m:new", PolicyConfig()) is None


def test_a_log_with_texts_keeps_the_bake_waiting_for_its_items(db_url):
    """The other side of the hash-only rule: texts are logged, too few labelled items yet: no decision."""
    from core import production
    from core.statedb import get_engine
    from loop import bake
    from loop.policy import PolicyConfig

    engine = get_engine(db_url)
    production.promote("m:old", reason="first", actor="test", engine=engine, verify=False)
    production.promote("m:new", reason="manual", actor="test", engine=engine, verify=False)
    write_days(engine, "m:new", [-0.01], per_day=40, base=dt.datetime.now(UTC))
    assert bake.bake_check(engine, types.SimpleNamespace(model_version="m:new"), PolicyConfig()) is None
    status = bake.bake_status(engine, "m:new", PolicyConfig())
    assert status["labelled_items_with_text"] == 20 and status["needed"] == PolicyConfig().bake_labels and status["state"] == "waiting for labelled items"


def test_retention_settings_are_checked():
    from core.retention import RetentionConfig
    from loop.controller import ControllerSettings

    with pytest.raises(ValueError, match="raw_days 10.0 > retention.days 5.0"):
        RetentionConfig(raw_days=10, days=5)
    with pytest.raises(ValueError):
        ControllerSettings.model_validate({"retention": {"days": 0}})
    assert ControllerSettings().retention.raw_days == 7 and ControllerSettings().retention.days == 90
