"""`driftloop log status | compact | vacuum | forget`: the real CLI in subprocesses, each test with
its own DRIFTLOOP_HOME, on a log written with `predlog.write_batch` (old rows through its `at=`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from tests.conftest import REPO, cli_json, run_cli

NOW = dt.datetime.now(dt.timezone.utc)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture()
def log(home):
    """The home's state DB, opened in this process the way the CLI opens it; closed afterwards."""
    from core import predlog
    from core.statedb import dispose_engine, get_engine

    url = f"sqlite:///{home.resolve() / 'state.db'}"
    engine = get_engine(url)
    predlog.ensure_schema(engine)
    yield engine
    dispose_engine(url)


def _write(engine, model: str, texts: list[str], prefix: str, at: dt.datetime | None = None) -> list[str]:
    """Log one prediction per text; returns their request ids."""
    from core import predlog
    from core.descriptors import DESCRIPTOR_COLUMNS

    rows = [predlog.LoggedPrediction(request_id=f"{prefix}{i:04d}", text=t, label="positive", confidence=0.9,
                                     probs={"positive": 0.9, "negative": 0.1}, descriptors=dict.fromkeys(DESCRIPTOR_COLUMNS, 1.0),
                                     truncated=False, embedding=np.ones(8, dtype=np.float32)) for i, t in enumerate(texts)]
    predlog.write_batch(engine, model, rows, at=at)
    return [r.request_id for r in rows]


def _rows(engine) -> dict[str, tuple]:
    """request id -> (model, text, embedding is kept) of every logged row."""
    from core.predlog import EMBEDDING, LOGGED, TEXT, predictions

    c = predictions.c
    with engine.connect() as conn:
        return {r: (m, t, e is not None)
                for r, m, t, e in conn.execute(select(c.request_id, c.model_version, TEXT, EMBEDDING).select_from(LOGGED))}


def _python(home: Path, code: str) -> None:
    """Run `code` in a subprocess with `home` as its DRIFTLOOP_HOME (BentoML binds its store at import)."""
    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _one_error_line(proc, starts: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith(f"error: {starts}") and proc.stderr.count("\n") == 1, proc.stderr


# --------------------------------------------------------------------------- status, compact, vacuum


def test_status_and_compact_on_a_log_with_old_rows(home, log):
    old = _write(log, "m:1", [f"old {i}" for i in range(3)], "old", at=NOW - dt.timedelta(days=40))
    mid = _write(log, "m:1", [f"mid {i}" for i in range(4)], "mid", at=NOW - dt.timedelta(days=5))
    new = _write(log, "m:2", [f"new {i}" for i in range(2)], "new", at=NOW - dt.timedelta(hours=2))

    status = cli_json(["log", "status", "--raw-days", "1", "--days", "30"], home)
    assert status["rows"] == 9 and status["pending_compaction"] == 7 and status["holds"] == []
    assert status["oldest_at"].startswith((NOW - dt.timedelta(days=40)).date().isoformat())
    assert status["bytes"] > 0 and status["disk_free_bytes"] > 0 and status["engine"] == "sqlite"
    text = run_cli(["log", "status"], home)
    assert text.returncode == 0, text.stderr
    assert "9 rows" in text.stdout and "40.0 days ago" in text.stdout and "holds: none" in text.stdout
    assert "rows for 90 days; 3 rows pending compaction" in text.stdout  # defaults: only the 40-day-old rows are past 7 days

    summary = cli_json(["log", "compact", "--raw-days", "1", "--days", "30"], home)
    assert summary["deleted"] == 3 and summary["compacted"] == 4 and summary["finished"] is True
    rows = _rows(log)
    assert not set(old) & set(rows)  # older than --days: gone
    assert all(rows[r][1] is None and rows[r][2] is False for r in mid)  # older than --raw-days: no text, no embedding
    assert all(rows[r][1] is not None and rows[r][2] for r in new)  # newer: whole
    after = cli_json(["log", "status", "--raw-days", "1", "--days", "30"], home)
    assert after["pending_compaction"] == 0 and after["oldest_raw_at"].startswith((NOW - dt.timedelta(hours=2)).date().isoformat())

    again = run_cli(["log", "compact"], home)  # defaults (7 and 90 days): nothing left to do
    assert again.returncode == 0 and again.stdout.startswith("compacted 0 rows"), again.stderr


@pytest.mark.parametrize("args, starts", [
    (["--raw-days", "30", "--days", "10"], "--raw-days 30 > --days 10"),
    (["--raw-days", "100"], "--raw-days 100 > --days 90"),
    (["--days", "-1"], "--days must be a positive number"),
    (["--raw-days", "0"], "--raw-days must be a positive number"),
])
def test_compact_refuses_a_bad_combination_in_one_line(home, args, starts):
    _one_error_line(run_cli(["log", "compact", *args], home), starts)


def test_vacuum_rewrites_sqlite_and_refuses_postgres_in_one_line(home, log):
    _write(log, "m:1", [f"text {i}" for i in range(50)], "v")
    out = cli_json(["log", "vacuum"], home)
    assert out["bytes_before"] > 0 and out["bytes_after"] > 0
    assert "503" in run_cli(["log", "vacuum", "--help"], home).stdout
    on_pg = run_cli(["log", "vacuum"], home, env={"DRIFTLOOP_DB_URL": "postgresql://nobody@127.0.0.1:1/none"})
    _one_error_line(on_pg, "log vacuum is for SQLite")


# --------------------------------------------------------------------------- forget: the log


@pytest.mark.parametrize("args, starts", [
    ([], "say what to forget"),
    (["--text-sha256", "abc"], "--text-sha256 'abc' is not a sha256"),
    (["--text-sha256", "z" * 64], "--text-sha256"),
    (["--request-id", "x" * 65], "--request-id"),
])
def test_forget_refuses_bad_input_in_one_line(home, args, starts):
    _one_error_line(run_cli(["log", "forget", *args], home), starts)


def test_forget_by_request_id_and_by_hash_deletes_only_those_rows(home, log):
    mine = _write(log, "m:1", ["my secret", "my other secret", "not mine"], "a")
    again = _write(log, "m:2", ["my other secret", "unrelated"], "b")  # the same text, served by another model

    out = cli_json(["log", "forget", "--request-id", mine[0], "--text-sha256", _sha("my other secret").upper(),
                    "--request-id", "never-logged"], home)
    assert out["rows_deleted"] == 3
    assert out["rows_by_request_id"] == {mine[0]: _sha("my secret")}
    assert sorted(out["text_hashes"]) == sorted([_sha("my secret"), _sha("my other secret")])
    rows = _rows(log)
    assert set(rows) == {mine[2], again[1]}  # every other row intact
    assert rows[mine[2]] == ("m:1", "not mine", True)
    assert len(out["not_done"]) == 1 and out["not_done"][0].startswith("request id never-logged matched no row")
    assert out["complete"] is True and out["datasets"] == [] and out["profiles"] == []
    on_disk = b"".join(f.read_bytes() for f in home.glob("state.db*"))  # secure_delete, then the WAL truncated
    assert b"not mine" in on_disk and b"my secret" not in on_disk and b"my other secret" not in on_disk

    from core import audit

    (event,) = audit.history(log, kinds=("log_forget",))
    assert event["rows_deleted"] == 3 and event["selectors"] == 3 and event["complete"] is True
    assert mine[0] not in json.dumps(event) and _sha("my secret") not in json.dumps(event), "the record names nobody"

    text = run_cli(["log", "forget", "--text-sha256", _sha("unrelated")], home)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("deleted 1 rows from the prediction log and 0 dataset files")
    assert text.stdout.rstrip().endswith("complete: no copy driftloop knows of is left")
    assert set(_rows(log)) == {mine[2]}


# --------------------------------------------------------------------------- forget: datasets and models


def _dataset_texts(home: Path, sha: str) -> list[str]:
    path = home / "bentoml" / "datasets" / f"{sha}.jsonl"
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines() if line]


def test_forget_deletes_unneeded_datasets_and_reports_what_served_models_need(home, log, tiny_model_dir, monkeypatch):
    from core import data_store

    # a served model, trained for real (tiny BERT): its lineage pins its training split ("own") and
    # its validation split (regression suite, also its reference profile)
    trained = cli_json(["train", "--data", "demo:reviews", "--base-model", str(tiny_model_dir), "--epochs", "1",
                        "--max-rows", "120", "--quiet", "--set", "report=false"], home)
    assert trained["promoted"] is True
    served = trained["model"]
    lineage = cli_json(["models", "show", served], home)["lineage"]["data_lineage"]
    own_sha, suite_sha = lineage["own"]["sha256"], lineage["regression_suite"]["sha256"]
    in_training, in_suite = _dataset_texts(home, own_sha)[0], _dataset_texts(home, suite_sha)[0]

    # a dataset no model's lineage names (a refinement's mix whose model was deleted, say)
    monkeypatch.setenv("DRIFTLOOP_HOME", str(home))
    monkeypatch.delenv("BENTOML_HOME", raising=False)
    loose = data_store.put([(in_training, "positive"), ("someone else's text", "negative")])
    loose_only = data_store.put([("only here", "negative")])

    rid = _write(log, served, [in_training, "a bystander"], "c")
    suite_rows = _write(log, served, [in_suite], "d")

    out = cli_json(["log", "forget", "--request-id", rid[0], "--text-sha256", _sha(in_suite)], home)
    assert out["rows_deleted"] == 2 and set(_rows(log)) == {rid[1]}
    by_sha = {d["sha256"]: d for d in out["datasets"]}
    assert set(by_sha) == {own_sha, suite_sha, loose.sha256}
    assert by_sha[loose.sha256]["deleted"] is True and by_sha[loose.sha256]["rows_matched"] == 1
    assert not data_store.path_of(loose).exists() and data_store.path_of(loose_only).exists()
    for sha, key in ((own_sha, "data_lineage.own.sha256"), (suite_sha, "data_lineage.regression_suite.sha256")):
        assert by_sha[sha]["deleted"] is False and f"{served} ({key})" in by_sha[sha]["needed_by"]
        assert (home / "bentoml" / "datasets" / f"{sha}.jsonl").exists()
        line = next(x for x in out["not_done"] if x.startswith(f"dataset {sha[:12]}"))
        assert served in line and "delete" in line and "from the model store first" in line and "\n" not in line
    assert {"model": served, "file": "reference.parquet", "rows": 1} in out["profiles"]  # the validation split
    assert any(x.startswith(f"model {served} holds 1 of the texts in its reference profile") for x in out["not_done"])
    assert out["complete"] is False
    assert not any(suite_rows[0] in x for x in out["not_done"])

    # once the served model is gone from the store, nothing needs those files: a second request deletes them
    proc = run_cli(["log", "forget", "--text-sha256", _sha(in_training)], home)
    assert proc.returncode == 0 and "INCOMPLETE" in proc.stdout and f"dataset {own_sha[:12]}" in proc.stdout, proc.stderr
    _python(home, f"from core import registry; registry.delete({served!r})")
    final = cli_json(["log", "forget", "--text-sha256", _sha(in_training), "--text-sha256", _sha(in_suite)], home)
    assert {d["sha256"] for d in final["datasets"] if d["deleted"]} == {own_sha, suite_sha}
    assert final["complete"] is True and final["not_done"] == []


def test_forget_and_status_on_postgres(home, postgres_server):
    """The same verbs on a partitioned Postgres log (DELETE ... RETURNING through the partitions)."""
    from core import predlog
    from core.statedb import dispose_engine, get_engine

    url = postgres_server.create_database()
    engine = get_engine(url)
    try:
        predlog.ensure_schema(engine)
        mine = _write(engine, "m:1", ["pg secret", "pg keep"], "p", at=NOW - dt.timedelta(days=3))
        later = _write(engine, "m:2", ["pg secret"], "q")
        env = {"DRIFTLOOP_DB_URL": url}
        out = cli_json(["log", "forget", "--text-sha256", _sha("pg secret")], home, env=env)
        assert out["rows_deleted"] == 2 and set(_rows(engine)) == {mine[1]}
        assert any(n.startswith("Postgres keeps deleted rows' bytes") for n in out["notes"]) and out["complete"] is True
        assert later[0] not in _rows(engine)
        status = cli_json(["log", "status"], home, env=env)
        assert status["engine"] == "postgresql" and status["bytes"] > 0 and status["disk_free_bytes"] is None
    finally:
        dispose_engine(url)
