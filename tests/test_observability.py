"""The shipped operations config against real engines.

promtool checks the Prometheus config and rules and runs the rules' unit tests; then a real
Prometheus, on the repo's own config pointed at this test's ports, scrapes a real service and a real
controller that served real traffic, and every dashboard expression and every metric an alert reads
must come back with data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, cli_json
from tests.service_helpers import Server, free_port

DEPLOY = REPO / "deploy"
PROM_DIR = DEPLOY / "prometheus"


def _binary(name: str) -> str:
    """A Prometheus tool: CI must have it (.ci/run installs the Debian package); elsewhere skip."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed: .ci/run installs the Debian package 'prometheus'")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


def _dashboard_exprs() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        panels = json.loads(path.read_text())["panels"]
        rows = [p for p in panels if p["type"] == "row"]
        assert all(r["title"] and "targets" not in r for r in rows), f"{path.name}: a row without a title, or with queries"
        for panel in [p for p in panels if p["type"] != "row"] + [c for r in rows for c in r.get("panels") or []]:
            for target in panel["targets"]:
                out.append((path.name, panel["title"], target["expr"]))
    return out


def _alert_metric_names() -> set[str]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    names = set()
    functions = {"sum", "rate", "increase", "histogram_quantile", "time", "absent", "vector", "by", "ignoring", "or", "and",
                 "le", "on", "max", "min", "avg", "predict_linear"}
    for group in rules["groups"]:
        for rule in group["rules"]:
            expr = re.sub(r"\{[^}]*\}", "", rule["expr"])  # drop label matchers
            expr = re.sub(r"\[[^\]]*\]", "", expr)  # and ranges
            for token in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
                if token not in functions and ("_" in token):
                    names.add(token)
    return names


def test_promtool_checks_config_rules_and_rule_unit_tests():
    promtool = _binary("promtool")
    for args in (["check", "config", str(PROM_DIR / "prometheus.yml")], ["check", "rules", str(PROM_DIR / "alerts.yml")],
                 ["test", "rules", str(PROM_DIR / "alerts_test.yml")]):
        proc = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    alerts = {r["alert"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    tested = {t["alertname"] for case in yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert alerts == tested, f"alerts without a unit test: {alerts - tested}"


def test_dashboards_are_generated_from_their_source(tmp_path):
    committed = {p.name: p.read_text() for p in (DEPLOY / "grafana" / "dashboards").glob("*.json")}
    subprocess.run([sys.executable, str(DEPLOY / "grafana" / "make_dashboards.py"), str(tmp_path)], check=True, capture_output=True)
    generated = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    assert committed and committed == generated, "dashboards JSON differs from make_dashboards.py: regenerate and commit"


def test_compose_mounts_the_files_the_tests_check():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    mounts = " ".join(v for s in compose["services"].values() for v in s.get("volumes", []) if isinstance(v, str))
    for rel in ("./prometheus/prometheus.yml", "./prometheus/alerts.yml", "./alertmanager/alertmanager.yml",
                "./grafana/provisioning", "./grafana/dashboards"):
        assert rel in mounts
        assert (DEPLOY / rel).exists()
    for service in compose["services"].values():
        if "image" in service:
            assert re.search(r":v?\d+\.\d+\.\d+$", service["image"]), f"unpinned image {service['image']}"
        for port in service.get("ports", []):  # published on loopback only: nothing here authenticates by itself
            assert str(port).startswith("127.0.0.1:"), f"{port} is published on every interface"


class Controller:
    def __init__(self, home: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
        env.pop("BENTOML_HOME", None)
        env.pop("DRIFTLOOP_DB_URL", None)
        self.log = open(home / "controller.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "driftloop", "controller", "--port", str(port), "--monitor-interval", "3600"],
                                     cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, (home / "controller.log").read_text()[-3000:]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise TimeoutError("controller not up")

    def stop(self) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code


def test_real_prometheus_scrapes_service_and_controller_and_every_panel_and_alert_has_data(tmp_path, tiny_model_dir):
    prometheus = _binary("prometheus")
    home = tmp_path / "home"
    home.mkdir()
    demo = REPO / "finetune" / "demo_data" / "reviews.tsv"
    cli_json(["train", "--data", str(demo), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
              "--promote", "always", "--set", "report=false"], home)
    server = Server(home).wait_ready()
    controller = None
    prom = None
    try:
        controller = Controller(home, free_port())
        texts = [line.split("\t")[0] for line in demo.read_text(encoding="utf-8").splitlines()[1:81]]
        ids = []
        for i in range(0, len(texts), 4):
            r = httpx.post(f"{server.url}/predict", json={"texts": texts[i:i + 4]}, timeout=60)
            assert r.status_code == 200, r.text
            ids += [p["request_id"] for p in r.json()]
        r = httpx.post(f"{server.url}/feedback", json={"items": [{"request_id": rid, "label": "positive"} for rid in ids[:40]]},
                       headers=server.auth("feedback"), timeout=60)
        assert r.status_code == 200, r.text
        out = cli_json(["monitor", "--once", "--min-samples", "50"], home)
        assert out["status"] == "ok"

        # the repo's Prometheus config, only pointed at this test's ports (and scraping every second)
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"].update({"scrape_interval": "1s", "evaluation_interval": "1s"})
        config["rule_files"] = [str(PROM_DIR / "alerts.yml")]
        config.pop("alerting", None)
        targets = {"driftloop-service": server.url, "driftloop-controller": controller.url}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [targets[job["job_name"]].removeprefix("http://")]}]
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        prom_port = free_port()
        prom_url = f"http://127.0.0.1:{prom_port}"
        prom_log = open(tmp_path / "prometheus.log", "w")
        prom = subprocess.Popen([prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=prom_log, stderr=subprocess.STDOUT,
                                start_new_session=True)

        def query(expr: str) -> list:
            r = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
            assert r.status_code == 200, f"{expr}: {r.text}"
            return r.json()["data"]["result"]

        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                up = query("up")
                if len(up) == 2 and all(s["value"][1] == "1" for s in up):
                    break
            except (httpx.HTTPError, AssertionError):
                pass
            time.sleep(1)
        else:
            raise AssertionError(f"Prometheus did not scrape both targets: {(tmp_path / 'prometheus.log').read_text()[-3000:]}")
        # traffic while Prometheus watches, so rates have two samples
        for _ in range(6):
            for i in range(0, 16, 4):
                assert httpx.post(f"{server.url}/predict", json={"texts": texts[i:i + 4]}, timeout=60).status_code == 200
            time.sleep(1)
        time.sleep(3)

        missing = []
        for dashboard, panel, expr in _dashboard_exprs():
            series = query(expr.replace("$__rate_interval", "1m"))
            if not series:
                missing.append(f"{dashboard} / {panel}: {expr}")
        assert not missing, "dashboard expressions without data:\n" + "\n".join(missing)

        absent = [name for name in sorted(_alert_metric_names()) if not query(f"count({name})")]
        assert not absent, f"metrics read by alert rules but not exported: {absent}"

        # the controller serves the pass's report at the stable URL linked from the dashboards
        r = httpx.get(f"{controller.url}/reports/latest", timeout=10)
        assert r.status_code == 200 and "<html" in r.text.lower()
        assert httpx.get(f"{controller.url}/reports/..%2Fstate.db", timeout=10).status_code == 404
        assert httpx.get(f"{controller.url}/reports/monitor-999999.html", timeout=10).status_code == 404
    finally:
        code = None
        try:
            if prom is not None:
                prom.terminate()
                prom.wait(timeout=30)
            if controller is not None:
                code = controller.stop()
        finally:
            server.stop()
    assert code == 0, "the controller did not exit cleanly on SIGTERM"


def test_controller_runs_scheduled_passes_keeps_its_schedule_across_restarts_and_stops_cleanly(tmp_path, tiny_model_dir):
    from tests.test_monitoring import _log_traffic

    home = tmp_path / "home"
    home.mkdir()
    demo = REPO / "finetune" / "demo_data" / "reviews.tsv"
    out = cli_json(["train", "--data", str(demo), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
                    "--promote", "always", "--set", "report=false"], home)
    rows = [(line.split("\t")[0], 0) for line in demo.read_text(encoding="utf-8").splitlines()[1:61]]
    _log_traffic(home, out["model"], rows)

    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)

    def run_controller(log_path: Path, min_pass_id: int) -> dict:
        """Start a controller, wait for a scheduled pass newer than `min_pass_id`, stop it; its last pass."""
        port = free_port()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "driftloop", "controller", "--port", str(port), "--monitor-interval", "1",
                                     "--min-samples", "50", "--window", "60", "--set", "monitor.min_new_predictions=50"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                deadline = time.time() + 90
                status = {}
                while time.time() < deadline:
                    assert proc.poll() is None, log_path.read_text()[-3000:]
                    try:
                        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
                        status = httpx.get(f"http://127.0.0.1:{port}/status", timeout=5).json()
                        last = status.get("last_monitor_pass") or {}
                        if "driftloop_monitor_window_predictions 60.0" in metrics and last.get("run_id", 0) > min_pass_id:
                            break
                    except httpx.HTTPError:
                        pass
                    time.sleep(0.5)
                else:
                    raise AssertionError(f"no scheduled pass reached /metrics:\n{log_path.read_text()[-3000:]}")
                assert sorted(j["id"] for j in status["jobs"]) == ["labels", "monitor", "retention"]
                assert status["last_monitor_pass"]["model_version"] == out["model"]
                # the admin routes are mounted and closed without the admin token (home/secrets/admin.token)
                admin = f"http://127.0.0.1:{port}/admin/rollback"
                assert httpx.post(admin, timeout=5).status_code == 401
                assert httpx.post(admin, headers={"Authorization": "Bearer wrong-token-of-some-length"}, timeout=5).status_code == 403
                token = (home / "secrets" / "admin.token").read_text().strip()
                refused = httpx.post(admin, headers={"Authorization": f"Bearer {token}"}, json={}, timeout=10)
                assert refused.status_code == 409 and "first" in refused.json()["error"], refused.text  # nothing to roll back to
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                code = proc.wait(timeout=60)
        assert code == 0, log_path.read_text()[-3000:]
        assert "controller stopped" in log_path.read_text()
        return status["last_monitor_pass"]

    first = run_controller(home / "controller-1.log", 0)
    # new traffic, so the next scheduled pass has new predictions to give a verdict on
    more = [(line.split("\t")[0], 0) for line in demo.read_text(encoding="utf-8").splitlines()[61:121]]
    _log_traffic(home, out["model"], more)
    # a restarted controller finds its schedule in the state DB (one job, not two) and goes on
    second = run_controller(home / "controller-2.log", first["run_id"])
    assert second["run_id"] > first["run_id"]

    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{home / 'state.db'}")
    with engine.connect() as conn:
        jobs = conn.execute(sa.text("select id from controller_jobs")).scalars().all()
        passes = conn.execute(sa.text("select count(*) from monitor_runs")).scalar_one()
    assert sorted(jobs) == ["labels", "monitor", "retention"]  # the schedule persists in the state DB for the next start
    assert passes >= 1
