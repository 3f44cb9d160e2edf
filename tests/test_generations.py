"""The loop over several generations: durable data lineage, replay from every ancestor, a regression
suite that grows with each promotion, and a controller restart between generations that changes
nothing (every input of a refinement is in the model store, the dataset store and the state DB)."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from driftloop.procs import Proc
from tests.conftest import DEMO, cli_json, run_cli
from tests.service_helpers import free_port
from tests.traffic import log_traffic

ADMIN_TOKEN = "generations-admin-token-0123456789"
REFINE_SETS = ["refine.min_fresh_labels=40", "refine.gate.min_gate_items=10", "refine.promote=false", "refine.epochs=1",
               "refine.min_reference_rows=50", "policy.mode=manual"]


def _rows(name: str) -> list[tuple[str, str]]:
    lines = (DEMO / name).read_text(encoding="utf-8").splitlines()[1:]
    return [(t, y) for t, y in (line.rsplit("\t", 1) for line in lines)]


def _env(home: Path) -> dict:
    env = {**os.environ, "DRIFTLOOP_HOME": str(home), "DRIFTLOOP_ADMIN_TOKEN": ADMIN_TOKEN}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    return env


def _lineage(home: Path, tag: str) -> dict:
    return cli_json(["models", "show", tag], home)["lineage"]


def _refine_through_a_controller(home: Path, kill: bool) -> dict:
    """Start a controller, ask it for a refinement, wait for its outcome, then stop it (SIGKILL if `kill`)."""
    port = free_port()
    controller = Proc(["controller", "--port", str(port), "--monitor-interval", "3600", "--lease-ttl", "2",
                       *[x for s in REFINE_SETS for x in ("--set", s)]], _env(home), home / f"controller-{port}.log")
    try:
        controller.wait_http(f"http://127.0.0.1:{port}/healthz")
        deadline = time.time() + 60  # after a SIGKILLed leader, this one leads once that lease expires
        while not httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()["leader"] and time.time() < deadline:
            time.sleep(0.5)
        before = len(cli_json(["history", "--kind", "retrain_succeeded"], home)["events"])
        r = httpx.post(f"http://127.0.0.1:{port}/admin/retrain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
        assert r.status_code == 202, r.text
        deadline = time.time() + 600
        while time.time() < deadline:
            events = cli_json(["history", "--kind", "retrain_succeeded"], home)["events"]
            if len(events) > before:
                return events[0]
            failed = cli_json(["history", "--kind", "retrain_failed"], home)["events"]
            assert not failed, failed
            time.sleep(2)
        raise AssertionError(f"no refinement outcome; see {controller.log_path}")
    finally:
        if kill:
            os.killpg(controller.proc.pid, signal.SIGKILL)
            controller.proc.wait(timeout=30)
            controller.log.close()
        else:
            controller.stop()


def test_two_generations_replay_every_ancestor_and_grow_the_regression_suite(tmp_path, tiny_model_dir, monkeypatch):
    from core import data_store
    from core.data_store import DatasetRef

    home = tmp_path / "home"
    home.mkdir()
    env = _env(home)
    gen0 = cli_json(["train", "--data", str(DEMO / "reviews.tsv"), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
                     "--promote", "always", "--set", "report=false", "--set", "data.val_fraction=0.25"], home)["model"]
    lin0 = _lineage(home, gen0)["data_lineage"]
    assert lin0["generation"] == 0 and lin0["own"]["rows"] > 300 and lin0["regression_suite"]["rows"] >= 140

    markets = _rows("markets.tsv")
    log_traffic(env, gen0, markets[:200], feedback=True)
    out1 = _refine_through_a_controller(home, kill=True)  # a controller killed after its generation
    gen1 = out1["model_version"]
    # the scratch space that used to hold a refinement's training file is gone: nothing depends on it
    shutil.rmtree(home / "runs", ignore_errors=True)
    cli_json(["models", "promote", gen1, "--force"], home)
    log_traffic(env, gen1, markets[200:400], feedback=True)
    out2 = _refine_through_a_controller(home, kill=False)  # a fresh controller runs generation 2
    gen2 = out2["model_version"]

    lin1, lin2 = _lineage(home, gen1), _lineage(home, gen2)
    d1, d2 = lin1["data_lineage"], lin2["data_lineage"]
    assert (d1["generation"], d2["generation"]) == (1, 2)
    assert lin2["parent"] == gen1 and lin1["parent"] == gen0
    assert d1["replay_by_generation"][gen0] > 0
    assert d2["replay_by_generation"][gen0] > 0 and d2["replay_by_generation"][gen1] > 0, d2
    # the replay budget (one replayed row per fresh training row) is shared equally between the generations
    budget = d2["fresh_rows"]
    assert sum(d2["replay_by_generation"].values()) == budget
    assert abs(d2["replay_by_generation"][gen0] - d2["replay_by_generation"][gen1]) <= 1

    # the suite: generation 0's held-out rows, plus each generation's gate items, never trained on
    monkeypatch.setenv("BENTOML_HOME", str(home / "bentoml"))  # read that home's dataset store (beside its models) from here
    s0, s1, s2 = lin0["regression_suite"]["rows"], d1["regression_suite"]["rows"], d2["regression_suite"]["rows"]
    assert s1 == s0 + lin1["refinement"]["gate_items"] and s2 == s1 + lin2["refinement"]["gate_items"] and s2 > s1 > s0
    suite2 = {t for t, _ in data_store.get(DatasetRef.from_json(d2["regression_suite"]))}
    mix2 = data_store.get(DatasetRef.from_json(d2["mix"]))
    assert not suite2 & {t for t, _ in mix2}, "a regression-suite item was trained on"
    # generation 2 trained on generation 1's own rows (replayed) and on its fresh ones
    own1 = {t for t, _ in data_store.get(DatasetRef.from_json(d1["own"]))}
    own2 = data_store.get(DatasetRef.from_json(d2["own"]))
    assert len({t for t, _ in mix2} & own1) == d2["replay_by_generation"][gen1]
    assert set(own2) <= set(mix2)
    assert len(suite2) >= s2 - 5  # texts are (nearly) unique

    # the gate scored both models on the whole inherited suite, and the reference profiles the traffic served
    gate2 = cli_json(["history", "--kind", "gate"], home)["events"][0]
    assert gate2["model_version"] == gen2 and gate2["regression_n"] == s1 and gate2["regression_p_value"] is not None
    assert lin2["reference"]["profile_source"].startswith(f"newest 200 texts served by {gen1}")
    # its reference accuracy comes from the population its profile comes from (the gate items), the suite's beside it
    assert lin2["reference"]["n"] == lin2["refinement"]["gate_items"] and lin2["reference"]["suite_n"] == s1
    # the suite by part: one per generation, each part's accuracy in the lineage, each tested (or named) by the gate
    assert [p["name"] for p in d2["regression_suite_parts"]] == ["g0", "g1", "g2"]
    assert [p["n"] for p in d2["regression_suite_parts"]] == [s0, s1 - s0, s2 - s1]
    assert [p["name"] for p in lin2["suite_accuracy_by_part"]] == ["g0", "g1", "g2"]
    assert all(0 <= p["accuracy"] <= 1 for p in lin2["suite_accuracy_by_part"])
    assert [(p["part"], p["n"]) for p in gate2["parts"]] == [("g0", s0), ("g1", s1 - s0)]
    assert all(p["needed"] == 619 and ("shown" in p or "harmed" in p) for p in gate2["parts"])
    shown = run_cli(["models", "show", gen2], home).stdout.split("regression suite by part")[1]
    assert [line.split()[0] for line in shown.strip().splitlines()[1:]] == ["g0", "g1", "g2"]
    assert lin2["training"]["train_rows"] > 0
    # both generations hold at least half the budget, so each gives half of it (within one row)
    assert lin0["own"]["rows"] >= budget and d1["fresh_rows"] >= budget - budget // 2
    assert set(d2["replay_by_generation"]) == {gen0, gen1}
    assert sorted(d2["replay_by_generation"].values()) == [budget // 2, budget - budget // 2]


def test_allocate_shares_replay_equally_and_gives_what_a_small_generation_lacks_to_the_others():
    from loop.refine import allocate

    assert allocate(100, {"g0": 1000, "g1": 1000}) == {"g0": 50, "g1": 50}
    assert allocate(100, {"g0": 1000, "g1": 10, "g2": 1000}) == {"g0": 45, "g1": 10, "g2": 45}
    assert allocate(7, {"g0": 2, "g1": 0}) == {"g0": 2, "g1": 0}
    assert sum(allocate(101, {"a": 50, "b": 50, "c": 50}).values()) == 101
    assert allocate(0, {"a": 5}) == {"a": 0}


def test_dataset_store_is_content_addressed_and_refuses_a_corrupt_file(tmp_path, monkeypatch):
    from core import data_store
    from core.errors import DriftloopError

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))
    rows = [("a text\twith a tab and \"quotes\"", "pos"), ("another", "neg")]
    ref = data_store.put(rows)
    assert data_store.put(rows) == ref and ref.rows == 2
    assert data_store.get(ref) == rows
    assert not list(data_store.store_dir().glob("*.tmp"))
    path = data_store.path_of(ref)
    path.write_bytes(path.read_bytes().replace(b"another", b"anothe!"))
    with pytest.raises(DriftloopError, match="corrupt"):
        data_store.get(ref)
    path.unlink()
    with pytest.raises(DriftloopError, match="missing"):
        data_store.get(ref)
