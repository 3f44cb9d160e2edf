"""Two real `driftloop controller` processes on one state DB: a leader lease lets only one run jobs.

Both serve HTTP; only the lease holder's scheduler runs monitor passes and the policy, so a drift
that triggers the policy starts exactly one refinement (two schedulers would each start one: the
refinement records `retrain_started` only seconds after the policy fired). SIGKILL of the leader:
the standby takes over once the lease expires, runs the passes, and does not retrain again.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from driftloop.procs import Proc
from tests.conftest import DEMO, cli_json
from tests.service_helpers import free_port
from tests.traffic import log_traffic

TTL_S = 4.0



@pytest.fixture(scope="module")
def champion(tmp_path_factory, tiny_model_dir) -> dict:
    """One trained model in a model store the variants share (each variant has its own state DB)."""
    home = tmp_path_factory.mktemp("leader") / "train-home"
    home.mkdir()
    out = cli_json(["train", "--data", str(DEMO / "reviews.tsv"), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
                    "--promote", "always", "--set", "report=false"], home)
    return {"tag": out["model"], "bentoml_home": home / "bentoml"}


def _env(home: Path, bentoml_home: Path, db_url: str) -> dict:
    env = {**os.environ, "DRIFTLOOP_HOME": str(home), "BENTOML_HOME": str(bentoml_home), "DRIFTLOOP_DB_URL": db_url}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


class Controller:
    """A real `driftloop controller` subprocess (driftloop.procs.Proc: own process group, log file)."""

    def __init__(self, name: str, home: Path, env: dict):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = home / f"controller-{name}.log"
        args = ["controller", "--port", str(self.port), "--monitor-interval", "1", "--min-samples", "50",
                "--set", "policy.mode=drift", "--set", "policy.consecutive_windows=1", "--set", "policy.min_new_labels=60",
                "--set", "refine.min_fresh_labels=60", "--set", "refine.gate.min_gate_items=18",
                "--set", "monitor.report=false", "--set", "monitor.embedding_permutations=200",
                "--set", "refine.epochs=1", "--set", "refine.promote=false", "--set", f"lease.ttl_s={TTL_S}"]
        self.p = Proc(args, env, self.log_path)
        self.proc = self.p.proc

    def wait_up(self, timeout: float = 90) -> "Controller":
        self.p.wait_http(f"{self.url}/healthz", timeout=timeout)
        return self

    def status(self) -> dict:
        return httpx.get(f"{self.url}/status", timeout=10).json()

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match, f"{name} not on {self.name}'s /metrics"
        return float(match.group(1))

    def tail(self) -> str:
        return self.log_path.read_text()[-3000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.p.log.close()

    def stop(self) -> int:
        self.p.stop()
        return self.proc.returncode


def _wait(predicate, timeout: float, what: str, controllers=()):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    logs = "\n".join(f"--- {c.name}:\n{c.tail()}" for c in controllers)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


@pytest.mark.parametrize("backend, kill", [("sqlite", "after_refinement"), ("postgres", "during_refinement")])
def test_two_controllers_one_leader_one_retrain_and_takeover_after_sigkill(backend, kill, champion, tmp_path, request):
    """SQLite: the leader is killed after its refinement finished. Postgres: during it (the refinement
    dies with its controller; the new leader records it as failed and, in the cooldown, does not
    start another)."""

    from core import alias, audit
    from core.statedb import dispose_engine, get_engine

    home = tmp_path / "home"
    home.mkdir()
    db_url = f"sqlite:///{home / 'state.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_server").create_database()
    engine = get_engine(db_url)
    alias.promote(champion["tag"], reason="test champion", engine=engine)
    env = _env(home, champion["bentoml_home"], db_url)

    # drifted traffic with feedback: financial news against a champion trained on product reviews
    rows = [tuple(line.split("\t")) for line in (DEMO / "markets.tsv").read_text(encoding="utf-8").splitlines()[1:151]]
    log_traffic(env, champion["tag"], rows, feedback=True)

    def passes() -> int:
        """Policy evaluations: one per scheduled run (with no new traffic there is no new verdict to store,
        and the policy runs on the last one)."""
        return len(audit.history(engine, limit=1000, kinds=("policy",)))

    def retrains() -> list[dict]:
        return audit.history(engine, limit=100, kinds=("retrain_started",))

    def outcomes() -> list[dict]:
        return audit.history(engine, limit=100, kinds=("retrain_succeeded", "retrain_failed"))

    a = Controller("a", home, env)
    b = None
    try:
        a.wait_up()
        b = Controller("b", home, env).wait_up()
        both = [a, b]

        # exactly one leader; the standby names it as the lease holder
        sa, sb = a.status(), b.status()
        assert [sa["leader"], sb["leader"]].count(True) == 1, (sa, sb)
        leader, standby = (a, b) if sa["leader"] else (b, a)
        lead_status, standby_status = (sa, sb) if leader is a else (sb, sa)
        assert standby_status["lease"]["holder"] == lead_status["holder"] != standby_status["holder"]
        assert lead_status["jobs"] and standby_status["jobs"] == []

        # the drift triggers the policy: one refinement, started by the leader's scheduler
        _wait(lambda: retrains(), 120, "a refinement to start", both)
        if kill == "after_refinement":
            _wait(outcomes, 180, "the refinement to finish", both)
            assert outcomes()[0]["kind"] == "retrain_succeeded", outcomes()[0]
            # more scheduled runs after it: the cooldown holds the policy, nobody starts a second one
            seen = passes()
            _wait(lambda: passes() >= seen + 2, 60, "passes after the refinement", both)
            assert leader.metric('driftloop_controller_retrains_total{outcome="started"}') == 1
        else:
            assert leader.status()["refine_running"] is True and not outcomes()
        assert len(retrains()) == 1
        assert leader.metric("driftloop_controller_leader") == 1 and standby.metric("driftloop_controller_leader") == 0
        assert leader.metric("driftloop_controller_monitor_jobs_total") >= 1
        assert standby.metric("driftloop_controller_monitor_jobs_total") == 0  # its scheduler never ran
        assert standby.metric('driftloop_controller_retrains_total{outcome="started"}') == 0
        assert standby.status()["leader"] is False

        # SIGKILL the leader (no chance to release its lease): the standby takes over when it expires
        before_kill = passes()
        leader.kill()
        _wait(lambda: standby.status()["leader"], TTL_S * 3 + 10, "the standby to be elected within ~ttl", both)
        new_status = _wait(lambda: (st := standby.status())["jobs"] and st, 30, "the new leader's scheduler", [standby])
        assert new_status["lease"]["holder"] == new_status["holder"] and new_status["lease"]["fencing"] == lead_status["lease"]["fencing"] + 1
        assert sorted(j["id"] for j in new_status["jobs"]) == ["labels", "monitor", "retention"]
        _wait(lambda: passes() >= before_kill + 2, 60, "policy runs by the new leader", [standby])
        assert standby.metric("driftloop_controller_monitor_jobs_total") >= 2
        if kill == "during_refinement":  # the new leader closed the dead leader's refinement as failed
            _wait(outcomes, 30, "the interrupted refinement to be recorded", [standby])
            assert [e["kind"] for e in outcomes()] == ["retrain_failed"]
        assert len(retrains()) == 1  # exactly one retrain over the whole run
        assert standby.stop() == 0, standby.tail()
        assert "controller stopped" in standby.log_path.read_text()
    finally:
        for c in (a, b):
            if c is not None:
                c.kill()
        dispose_engine(db_url)
