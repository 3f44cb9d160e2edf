"""The closed loop: bake/rollback, one refinement at a time, and the whole demo end to end."""

from __future__ import annotations

import sys
import time

import pytest

from tests.conftest import cli_json, run_cli


def test_bake_rolls_back_a_new_champion_that_does_worse_and_keeps_a_good_one(db_url):
    from finetune import alias
    from finetune.statedb import get_engine
    from monitoring import audit, loop
    from monitoring.policy import PolicyConfig

    engine = get_engine()
    alias.promote("m:1", engine=engine)
    alias.promote("m:2", engine=engine)
    audit.record(engine, "promotion", "m:2", previous="m:1", previous_gate_accuracy=0.90)
    few = {"model_version": "m:2", "quality": {"realized_accuracy": 0.5, "labelled": 10}}
    assert loop.bake_check(engine, few, PolicyConfig(min_labels=50), epsilon=0.01) is None  # not enough labels yet
    bad = {"model_version": "m:2", "quality": {"realized_accuracy": 0.80, "labelled": 100}}
    assert loop.bake_check(engine, bad, PolicyConfig(min_labels=50), epsilon=0.01) == "rollback"
    assert alias.current(engine=engine).tag == "m:1"
    assert audit.last(engine, "rollback")["to"] == "m:1"

    alias.promote("m:3", engine=engine)
    audit.record(engine, "promotion", "m:3", previous="m:1", previous_gate_accuracy=0.90)
    good = {"model_version": "m:3", "quality": {"realized_accuracy": 0.895, "labelled": 100}}
    assert loop.bake_check(engine, good, PolicyConfig(min_labels=50), epsilon=0.01) == "bake_passed"
    assert loop.bake_check(engine, good, PolicyConfig(min_labels=50), epsilon=0.01) is None  # decided once
    assert alias.current(engine=engine).tag == "m:3"


def test_only_one_refinement_runs_at_a_time_and_a_failure_is_recorded(db_url, monkeypatch):
    from finetune.statedb import get_engine
    from monitoring import audit, loop
    from monitoring.refine import RefineConfig

    engine = get_engine()
    monkeypatch.setattr(loop, "refine_command", lambda *a, **k: [sys.executable, "-c", "import time, sys; time.sleep(1.5); sys.exit(3)"])
    assert loop.start_refine(engine, RefineConfig(), "test", "m:1") is True
    assert loop.refine_running()
    assert loop.start_refine(engine, RefineConfig(), "test", "m:1") is False  # never two at once
    deadline = time.time() + 30
    while loop.refine_running() and time.time() < deadline:
        time.sleep(0.1)
    assert not loop.refine_running()
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
                             "--port", str(port), "--controller-port", str(cport), "--prometheus-port", str(pport)],
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
