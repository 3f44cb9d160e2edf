"""The closed loop: bake/rollback, one refinement at a time, and the whole demo end to end."""

from __future__ import annotations

import sys
import time

import pytest

from tests.conftest import cli_json, run_cli


def _log_labelled(engine, version: str, served_and_truth: list[tuple[str, str]], runtime: str = "torch") -> None:
    """Predictions of `version` with their feedback, straight into the prediction log (texts t0, t1, ...)."""
    import uuid

    import numpy as np

    from core import predlog
    from core.descriptors import DESCRIPTOR_COLUMNS

    predlog.ensure_schema(engine)
    rows = [predlog.LoggedPrediction(uuid.uuid4().hex, f"t{i}", served, 0.9, {"pos": 0.9, "neg": 0.1},
                                     {k: 1.0 for k in DESCRIPTOR_COLUMNS}, False, np.zeros(4, np.float32))
            for i, (served, _) in enumerate(served_and_truth)]
    predlog.write_batch(engine, version, rows, runtime=runtime)
    predlog.record_feedback(engine, [(r.request_id, y) for r, (_, y) in zip(rows, served_and_truth)], lambda v: ["pos", "neg"])


class _Shadow:
    """The previous champion's answers on the bake's items (text t<i> -> correct or not), and what it was asked."""

    def __init__(self, old_correct: list[bool]):
        self.old_correct, self.asked = old_correct, []

    def correct(self, tag, texts, labels, served_on=None):
        self.asked.append((tag, list(texts)))
        self.served_on = served_on  # the runtime the log says the previous champion served on
        return [self.old_correct[int(t[1:])] for t in texts]

    def release(self):
        pass


def test_bake_pairs_the_previous_champion_on_the_same_items_and_rolls_back_only_on_evidence(db_url):
    from core import alias, audit, production
    from core.statedb import get_engine
    from loop import bake
    from loop.policy import PolicyConfig
    from monitoring.verdict import Verdict

    engine = get_engine()
    policy = PolicyConfig(bake_labels=100, bake_alpha=0.05)
    production.promote("m:1", reason="first", actor="test", engine=engine, verify=False)
    assert bake.in_bake(engine, "m:1") is None  # a first model has nothing to bake against
    production.promote("m:2", reason="gate", actor="test", engine=engine, verify=False)
    assert bake.in_bake(engine, "m:2")["previous"] == "m:1"
    _log_labelled(engine, "m:1", [("pos", "pos")] * 3, runtime="onnx-int8")  # m:1 served on int8 before the promotion
    # 100 labelled items served by m:2: right on 80; m:1 would have been right on 80 of them plus 15 more
    _log_labelled(engine, "m:2", [("pos", "pos")] * 80 + [("pos", "neg")] * 20)
    worse = _Shadow([True] * 80 + [True] * 15 + [False] * 5)
    assert bake.bake_check(engine, Verdict("m:2"), PolicyConfig(bake_labels=101), scorer=worse) is None  # too few yet
    assert bake.bake_check(engine, Verdict("m:2"), policy, scorer=worse) == "rollback"
    assert worse.asked == [("m:1", [f"t{i}" for i in range(100)])]  # the same items, scored by the previous champion
    assert worse.served_on == "onnx-int8"  # on the runtime the log says it served on
    assert alias.current(engine=engine).tag == "m:1"
    rb = audit.last(engine, "rollback")
    assert rb["to"] == "m:1" and rb["paired"]["losses"] == 15 and rb["paired"]["gains"] == 0 and rb["p_value_worse"] < 0.05
    assert alias.history(engine=engine)[0]["action"] == "rollback"  # both trails, one move

    # a new champion 1 point lower on 100 items (noise: 3 lost, 2 gained) is kept
    production.promote("m:3", reason="gate", actor="test", engine=engine, verify=False)
    _log_labelled(engine, "m:3", [("pos", "pos")] * 85 + [("pos", "neg")] * 15)
    close = _Shadow([True] * 83 + [False] * 2 + [True] * 3 + [False] * 12)
    assert bake.bake_check(engine, Verdict("m:3"), policy, scorer=close) == "bake_passed"
    assert bake.bake_check(engine, Verdict("m:3"), policy, scorer=close) is None  # decided once
    assert bake.in_bake(engine, "m:3") is None
    assert alias.current(engine=engine).tag == "m:3"
    passed = audit.last(engine, "bake_passed")
    assert passed["paired"]["n"] == 100 and passed["paired"]["losses"] == 3 and passed["paired"]["gains"] == 2


def test_a_stale_leader_cannot_move_production(db_url):
    from core import alias, audit, production
    from core.errors import DriftloopError
    from core.statedb import get_engine
    from loop import lease

    engine = get_engine()
    lease.ensure_schema(engine)
    production.promote("m:1", reason="first", actor="test", engine=engine, verify=False)
    first = lease.try_acquire(engine, "controller-a", ttl_s=0.5)
    fence_a = lease.Fence("controller", "controller-a", first.fencing)
    production.promote("m:2", reason="a leads", actor="controller", engine=engine, verify=False, fence=fence_a.check)
    time.sleep(0.6)  # a's lease expires; b takes it: a new term
    second = lease.try_acquire(engine, "controller-b", ttl_s=30)
    assert second is not None and second.fencing == first.fencing + 1
    events_before = len(audit.history(engine, limit=100))
    with pytest.raises(DriftloopError, match="stale leader"):
        production.promote("m:3", reason="late write", actor="controller", engine=engine, verify=False, fence=fence_a.check)
    with pytest.raises(DriftloopError, match="stale leader"):
        production.rollback(reason="late write", actor="controller", engine=engine, fence=fence_a.check)
    assert alias.current(engine=engine).tag == "m:2"  # nothing moved, nothing audited
    assert len(audit.history(engine, limit=100)) == events_before
    assert [h["tag"] for h in alias.history(engine=engine)] == ["m:2", "m:1"]
    fence_b = lease.Fence("controller", "controller-b", second.fencing)
    production.rollback(reason="b leads", actor="controller", engine=engine, fence=fence_b.check)
    assert alias.current(engine=engine).tag == "m:1"
    assert lease.Fence.from_arg(fence_b.to_arg()) == fence_b


def test_cli_promote_and_rollback_write_the_audit_trail(home, tiny_model_dir):
    from tests.conftest import DEMO

    first = cli_json(["train", "--data", str(DEMO / "reviews.tsv"), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
                      "--promote", "always", "--set", "report=false"], home)["model"]
    second = cli_json(["train", "--data", str(DEMO / "reviews.tsv"), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
                       "--promote", "never", "--set", "report=false"], home)["model"]
    cli_json(["models", "promote", second, "--reason", "by hand"], home)
    cli_json(["models", "rollback"], home)
    events = cli_json(["history"], home)["events"]
    moves = [(e["kind"], e["model_version"], e.get("actor")) for e in events if e["kind"] in ("promotion", "rollback")]
    assert moves == [("rollback", second, "cli"), ("promotion", second, "cli"), ("promotion", first, "train")]


def test_configs_whose_gate_can_never_decide_or_that_train_on_anonymous_text_are_refused(home, monkeypatch):
    from loop.refine_config import RefineConfig

    cases = [
        (["refine.min_fresh_labels=60", "refine.gate_fraction=0.3"], "error: invalid config: refine: Value error, min_fresh_labels 60 x"),
        (["policy.min_new_labels=50"], "error: invalid config: config: Value error, policy.min_new_labels 50 < refine.min_fresh_labels 100"),
        (["refine.self_training=true"], "error: invalid config: refine: Value error, self_training=true trains on /predict traffic"),
    ]
    for sets, expected in cases:
        proc = run_cli(["controller", *[x for s in sets for x in ("--set", s)]], home, timeout=120)
        assert proc.returncode == 2, (sets, proc.stderr[-1500:])
        assert proc.stderr.strip().splitlines()[-1].startswith(expected), (sets, proc.stderr.strip().splitlines()[-1])
    monkeypatch.setenv("DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN", "true")
    assert RefineConfig(self_training=True).self_training  # known callers only: allowed


def test_only_one_refinement_runs_at_a_time_and_a_failure_is_recorded(db_url, monkeypatch):
    from core import audit
    from core.statedb import get_engine
    from loop import refine_jobs
    from loop.refine_config import RefineConfig

    engine = get_engine()
    jobs = refine_jobs.RefineJobs()
    monkeypatch.setattr(refine_jobs, "refine_command", lambda *a, **k: [sys.executable, "-c", "import time, sys; time.sleep(1.5); sys.exit(3)"])
    assert jobs.start(engine, RefineConfig(), "test", "m:1") is True
    assert jobs.running()
    assert jobs.start(engine, RefineConfig(), "test", "m:1") is False  # never two at once
    deadline = time.time() + 30
    while jobs.running() and time.time() < deadline:
        time.sleep(0.1)
    assert not jobs.running()
    failed = audit.last(engine, "retrain_failed")
    assert failed is not None and failed["exit_code"] == 3


def test_refine_without_fresh_labels_fails_with_one_line_and_is_recorded(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    from tests.conftest import DEMO

    cli_json(["train", "--data", str(DEMO / "reviews.tsv"), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
              "--promote", "always", "--set", "report=false"], home)
    proc = run_cli(["refine", "--quiet"], home)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: only 0 fresh labelled predictions")
    events = cli_json(["history", "--kind", "retrain_failed"], home)["events"]
    assert len(events) == 1 and "fresh labelled" in events[0]["error"]


@pytest.mark.slow
def test_demo_end_to_end_retrains_only_after_the_shift_and_improves_the_shifted_domain(tmp_path):
    out = cli_json(["demo", "--home", str(tmp_path / "demo")], tmp_path, timeout=1200)
    assert out["retrains_during_stable"] == 0
    assert out["promotions"] == 1
    assert out["served_version_changed"] is True
    assert out["failed_requests"] == 0
    assert out["shifted_accuracy_after"] >= out["shifted_accuracy_before"] + 0.10, out
    assert out["source_accuracy_after"] >= out["source_accuracy_before"] - 0.01, out
    assert out["seconds_shift_to_promotion"] is not None and out["seconds_total"] < 600


def test_up_runs_service_controller_and_prometheus_and_stops_them_all_on_ctrl_c(tmp_path, tiny_model_dir):
    import os
    import shutil
    import signal
    import subprocess

    import httpx
    import psutil

    from tests.conftest import REPO
    from tests.service_helpers import free_port

    home = tmp_path / "home"
    home.mkdir()
    port, cport, pport = free_port(), free_port(), free_port()
    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    log = open(home / "up.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "driftloop", "up", "--base-model", str(tiny_model_dir), "--epochs", "1",
                             "--port", str(port), "--controller-port", str(cport), "--prometheus-port", str(pport),
                             "--no-labels"],  # Label Studio under `up`: tests/test_operators.py
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    want = [f"http://127.0.0.1:{port}/readyz", f"http://127.0.0.1:{cport}/healthz"]
    if shutil.which("prometheus"):
        want.append(f"http://127.0.0.1:{pport}/-/ready")
    try:
        deadline = time.time() + 240
        pending = list(want)
        while pending and time.time() < deadline:
            assert proc.poll() is None, (home / "up.log").read_text()[-3000:]
            try:
                if httpx.get(pending[0], timeout=2).status_code == 200:
                    pending.pop(0)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert not pending, f"not up: {pending}\n{(home / 'up.log').read_text()[-3000:]}"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"texts": ["a great product"]}, timeout=30)
        assert r.status_code == 200
    finally:
        os.kill(proc.pid, signal.SIGINT)
        code = proc.wait(timeout=120)
        log.close()
    assert code == 0, (home / "up.log").read_text()[-3000:]
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    out = (home / "up.log").read_text()
    assert f"http://127.0.0.1:{port}" in out and f"http://127.0.0.1:{cport}" in out


def test_loop_commands_reject_bad_input_with_one_line(home):
    cases = [
        (["replay", "--data", "demo:reviews", "--url", "http://127.0.0.1:9"], "error: service not reachable"),
        (["replay", "--data", str(home / "missing.tsv")], "error: data file not found"),
        (["controller", "--set", "policy.mode=sometimes"], "error: invalid config: policy.mode"),
        (["controller", "--set", "policy.cooldownn_s=3"], "error: invalid config: policy.cooldownn_s"),
        (["retrain"], "error: no production model to refine"),
        (["rollback"], "error:"),
    ]
    for args, expected in cases:
        proc = run_cli(args, home, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-1500:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(expected), (args, last)


def test_scheduled_passes_give_a_verdict_only_on_enough_new_predictions(home, tiny_model_dir):
    """K drifted windows must rest on K x M distinct predictions: a pass re-reading the same rows gives
    no new verdict, so one drifted window re-tested on a timer can never satisfy K."""
    import os

    import httpx

    from driftloop.procs import Proc
    from tests.conftest import DEMO
    from tests.service_helpers import free_port
    from tests.traffic import log_traffic

    tag = cli_json(["train", "--data", str(DEMO / "reviews.tsv"), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
                    "--promote", "always", "--set", "report=false"], home)["model"]
    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    markets = [line.rsplit("\t", 1)[0] for line in (DEMO / "markets.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    log_traffic(env, tag, [(t, 0) for t in markets[:120]])
    port = free_port()
    controller = Proc(["controller", "--port", str(port), "--monitor-interval", "1", "--window", "100", "--min-samples", "50",
                       "--set", "monitor.min_new_predictions=60", "--set", "monitor.report=false", "--set", "policy.mode=manual"],
                      env, home / "controller.log")

    from core.statedb import get_engine
    from monitoring import store

    engine = get_engine(f"sqlite:///{home / 'state.db'}")

    def verdicts() -> list[dict]:
        store.ensure_schema(engine)
        return [r for r in store.recent(engine, limit=50) if r["status"] == "ok"]

    def jobs_run() -> float:
        """Scheduled monitor passes the controller has run (its own counter, on /metrics)."""
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        line = next(x for x in metrics.splitlines() if x.startswith("driftloop_controller_monitor_jobs_total "))
        return float(line.split()[-1])

    def after_more_passes(n: int, timeout: float = 60) -> None:
        """Return once the scheduler ran `n` more monitor passes: "no new verdict" then means the
        passes ran and decided so, not that none happened to run."""
        target = jobs_run() + n
        deadline = time.time() + timeout
        while jobs_run() < target:
            assert time.time() < deadline, f"fewer than {n} scheduled passes in {timeout}s:\n{(home / 'controller.log').read_text()[-2000:]}"
            time.sleep(0.3)

    try:
        controller.wait_http(f"http://127.0.0.1:{port}/healthz")
        deadline = time.time() + 60
        while not verdicts() and time.time() < deadline:
            time.sleep(0.5)
        after_more_passes(4)  # scheduled passes with no new traffic: no new verdict
        first = verdicts()
        assert len(first) == 1 and first[0]["window_last_id"] == 120, first
        log_traffic(env, tag, [(t, 0) for t in markets[120:160]])  # 40 new < 60: still none
        after_more_passes(3)
        assert len(verdicts()) == 1
        log_traffic(env, tag, [(t, 0) for t in markets[160:190]])  # 70 new since the verdict
        deadline = time.time() + 30
        while len(verdicts()) < 2 and time.time() < deadline:
            time.sleep(0.5)
        second = verdicts()
        assert len(second) == 2 and second[0]["window_last_id"] == 190 and second[0]["window_first_id"] > 90
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        skipped = [line for line in metrics.splitlines() if line.startswith('driftloop_monitor_passes_total{outcome="no_new_data"}')]
        assert skipped and float(skipped[0].split()[-1]) >= 5, skipped
    finally:
        controller.stop()
