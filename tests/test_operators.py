"""What an operator sees, checked in a real browser: `driftloop up` starts the service, the controller,
a real Prometheus with the shipped rules, Evidently's UI and Label Studio; traffic drifts; headless Chromium
(Debian package chromium-headless-shell) opens the Evidently project page, the latest monitor report
and Prometheus's alerts page, and the test asserts on what they render. Then what `up` started dies
with it on kill -9, and a port in use is one line naming its holder.

Set DRIFTLOOP_SCREENSHOTS=DIR to keep the pages' screenshots (README's images come from this test).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from driftloop.procs import Proc
from tests.conftest import DEMO, cli_json, run_cli
from tests.service_helpers import free_port


def _binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail(f"{names[0]} is not installed: .ci/run installs it (make test)")
    pytest.skip(f"{names[0]} is not installed (make chromium / make prometheus)")


def _chromium() -> list[str]:
    binary = _binary("chromium-headless-shell", "chromium")
    headless = [] if binary.endswith("headless-shell") else ["--headless"]
    # root in a container has no user namespaces for the sandbox; the pages are our own, on loopback
    return [binary, *headless, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=20000"]


def render(url: str) -> str:
    """The page's DOM after its scripts ran (the Evidently UI is a single-page app that fetches its data)."""
    out = subprocess.run([*_chromium(), "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def screenshot(url: str, path: Path, size: str = "1280,860") -> None:
    out = subprocess.run([*_chromium(), f"--window-size={size}", f"--screenshot={path}", url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and path.is_file() and path.stat().st_size > 10_000, out.stderr[-2000:]
    keep = os.environ.get("DRIFTLOOP_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def _wait_for_line(log: Path, pattern: str, proc: Proc, timeout: float) -> re.Match:
    deadline = time.time() + timeout
    while time.time() < deadline:
        match = re.search(pattern, log.read_text(), re.M)
        if match:
            return match
        assert proc.proc.poll() is None, f"driftloop up exited:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {pattern!r} in {log}:\n{log.read_text()[-3000:]}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _descendants(pid: int) -> set[int]:
    """Every process below `pid` (from /proc: children of children, in any process group)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.mark.slow  # the whole stack, three browser renders and an alert to wait for: about 1.5 minutes
def test_up_gives_operators_real_pages_and_everything_dies_with_it(tmp_path, tiny_model_dir):
    _binary("prometheus")
    _chromium()
    home = tmp_path / "home"
    home.mkdir()
    champion = cli_json(["train", "--data", "demo:reviews", "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
                         "--promote", "always", "--set", "report=false"], home)["model"]
    ports = {name: free_port() for name in ("service", "controller", "prometheus", "ui", "labels")}
    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    for key in ("BENTOML_HOME", "DRIFTLOOP_DB_URL", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(key, None)
    log = home / "up.log"
    family: set[int] = set()  # what `up` started, known before it is killed, so a failure still cleans up
    up = Proc(["up", "--port", str(ports["service"]), "--controller-port", str(ports["controller"]),
               "--prometheus-port", str(ports["prometheus"]), "--ui-port", str(ports["ui"]), "--labels-port", str(ports["labels"]),
               "--scrape-interval", "1s"], env, log)
    try:
        _wait_for_line(log, r"^Ctrl-C stops everything", up, timeout=300)
        text = log.read_text()
        service = f"http://127.0.0.1:{ports['service']}"
        prom = f"http://127.0.0.1:{ports['prometheus']}"
        project_url = re.search(r"^evidently:\s+(http://127\.0\.0\.1:\d+/projects/[0-9a-f-]+)", text, re.M).group(1)
        alerts_url = re.search(r"alerts of the shipped rules: (http://\S+?)[;)]", text).group(1)
        assert alerts_url.startswith(prom)
        ui = project_url.split("/projects/")[0]
        # Label Studio, the annotation queue: up, on loopback, with the controller told where it is
        labels_url = f"http://127.0.0.1:{ports['labels']}"
        assert re.search(rf"^labels:\s+{re.escape(labels_url)}\s", text, re.M), text[-3000:]
        assert httpx.get(f"{labels_url}/health", timeout=10).status_code == 200
        status = httpx.get(f"http://127.0.0.1:{ports['controller']}/status", timeout=10).json()
        assert status["labels"]["tool"]["url"] == labels_url
        project_id = project_url.rsplit("/", 1)[1]

        # a harmful shift: the reviews model gets financial news; three passes in a row see it
        markets = [line.split("\t")[:2] for line in (DEMO / "markets.tsv").read_text(encoding="utf-8").splitlines()[1:]]
        served = []  # (request id, true label)
        for round_ in range(3):
            for i in range(0, 120, 4):
                chunk = markets[(round_ * 120 + i) % len(markets):][:4]
                r = httpx.post(f"{service}/predict", json={"texts": [t for t, _ in chunk]}, timeout=60)
                assert r.status_code == 200, r.text
                served += [(p["request_id"], y) for p, (_, y) in zip(r.json(), chunk)]
            out = cli_json(["monitor", "--once", "--window", "120", "--min-samples", "100"], home)
            assert out["drift"] is True, out

        # Prometheus: the shipped rule fires (the controller exports the streak, Prometheus scrapes it)
        deadline = time.time() + 120
        firing, alerts = [], []
        while time.time() < deadline and not firing:
            alerts = httpx.get(f"{prom}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
            firing = [a for a in alerts if a["labels"]["alertname"] == "DriftloopDriftPersisting" and a["state"] == "firing"]
            time.sleep(1)
        assert firing, f"DriftloopDriftPersisting never fired: {alerts}"
        page = render(alerts_url)
        assert "DriftloopDriftPersisting" in page and re.search(r"(?i)firing\s*\(\s*[1-9]", page), page[-3000:]
        screenshot(alerts_url, tmp_path / "prometheus-alerts.png")

        # Evidently UI: the project page with its dashboard, the reports, the latest one showing the drift
        page = render(project_url)
        assert "driftloop monitor" in page and "Accuracy per pass" in page and "Drift tests: −log10 p per test" in page, page[-3000:]
        assert "This dashboard is currently empty" not in page and "0.0…" not in page  # p-values as -log10 p: readable ticks
        accuracy_panel = page.split("Accuracy per pass")[1].split("The estimate's error")[0]
        assert re.search(r'<path[^>]* d="M\s*[\d.]+', accuracy_panel), "the accuracy panel plots a line"
        screenshot(project_url, tmp_path / "evidently-project.png")
        snapshots = httpx.get(f"{ui}/api/projects/{project_id}/snapshots", timeout=10).json()
        assert len(snapshots) >= 3
        latest = max(snapshots, key=lambda s: s["timestamp"])
        report_url = f"{project_url}/reports/{latest['id']}"
        page = render(report_url)
        assert "Drift in column" in page and "Data drift detected" in page, page[-3000:]
        screenshot(report_url, tmp_path / "evidently-report.png", size="1280,1400")
        # the controller's stable link to the newest pass's report is a page that exists
        assert httpx.get(f"http://127.0.0.1:{ports['controller']}/reports/latest", timeout=10).status_code == 200
        # the story an operator reads after a promotion: labels come back, a refinement is gated, the
        # operator promotes its challenger by hand, with reasons that try to inject markup
        token = (home / "secrets" / "feedback.token").read_text().strip()
        for i in range(0, len(served), 60):
            r = httpx.post(f"{service}/feedback", json={"items": [{"request_id": rid, "label": y} for rid, y in served[i:i + 60]]},
                           headers={"Authorization": f"Bearer {token}"}, timeout=60)
            assert r.status_code == 200, r.text
        refined = cli_json(["refine", "--quiet", "--no-promote", "--trigger", "<script>alert('trigger')</script> by hand",
                            "--set", "epochs=1"], home, timeout=600)
        challenger = refined["challenger"]
        promoted = run_cli(["models", "promote", challenger, "--reason", "<img src=x onerror=alert(1)> the operator's call"], home)
        assert promoted.returncode == 0, promoted.stderr
        controller_url = f"http://127.0.0.1:{ports['controller']}/"
        page = render(controller_url)
        short = lambda tag: f"{tag.split(':')[0]}:{tag.split(':')[1][:8]}…"  # noqa: E731
        assert "driftloop controller" in page and "Where the serving model came from" in page, page[-3000:]
        lineage = page.split('id="lineage"')[1].split("</table>")[0]
        assert lineage.index(short(challenger)) < lineage.index(short(champion)), "the chain, newest first: challenger, then its parent"
        assert ("failed" in lineage or "passed" in lineage) and "fresh " in lineage  # the gate the challenger went through
        if not refined["gate"]["passed"]:
            assert html.escape(refined["gate"]["reasons"][0].split(" (")[0], quote=False) in lineage  # and why it failed
        events = page.split('id="events"')[1].split("</table>")[0]
        assert "promotion" in events and "the operator's call" in events and "gate" in events
        # injected markup is text: escaped in the DOM, no element made from it
        assert "<script>alert('trigger')</script>" not in page and "<img src=x" not in page and "<img src=\"x\"" not in page
        assert "&lt;script&gt;alert('trigger')&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
        assert f'href="{alerts_url}"' in page and f'href="{project_url}"' in page and f'href="{labels_url}"' in page
        screenshot(controller_url, tmp_path / "controller-page.png", size="1280,1300")

        # kill -9 of `up`: every process it started, BentoML's workers included, goes with it
        family = _descendants(up.proc.pid)
        assert len(family) >= 6, family  # serve, BentoML's arbiter and worker, controller, prometheus, evidently ui, label studio
        os.kill(up.proc.pid, signal.SIGKILL)
        up.proc.wait(timeout=10)
        deadline = time.time() + 60
        while time.time() < deadline and (_alive(family) or not all(_port_free(p) for p in ports.values())):
            time.sleep(0.5)
        assert not _alive(family), {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:120] for pid in _alive(family)}
        assert all(_port_free(p) for p in ports.values())
    finally:
        family |= _descendants(up.proc.pid) if up.proc.poll() is None else set()
        up.stop()
        for pid in _alive(family):  # anything that outlived `up` (the failure this test exists to catch)
            os.kill(pid, signal.SIGKILL)


def test_serve_dies_with_its_supervisor_and_a_taken_port_is_one_line(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    cli_json(["train", "--data", "demo:reviews", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "120",
              "--quiet", "--promote", "always", "--set", "report=false"], home)
    port = free_port()
    env = {**os.environ, "DRIFTLOOP_HOME": str(home), "DRIFTLOOP_SERVICE_RUNTIME": "torch"}
    for key in ("BENTOML_HOME", "DRIFTLOOP_DB_URL", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(key, None)
    serve = Proc(["serve", "--port", str(port)], env, home / "serve.log")
    try:
        serve.wait_http(f"http://127.0.0.1:{port}/readyz")
        # the port is taken: a second server says so in one line, naming the holder, and exits 2
        second = run_cli(["serve", "--port", str(port)], home, timeout=60, env={"DRIFTLOOP_SERVICE_RUNTIME": "torch"})
        assert second.returncode == 2
        line = second.stderr.strip()
        assert "\n" not in line and f"port {port} is in use by pid" in line and "Traceback" not in line, second.stderr
        holder = int(re.search(r"by pid (\d+)", line).group(1))
        family = _descendants(serve.proc.pid)
        assert holder in family  # a BentoML process of the first server
        # kill -9 of the supervisor: BentoML's arbiter and its worker follow, the port is free again
        os.kill(serve.proc.pid, signal.SIGKILL)
        serve.proc.wait(timeout=10)
        deadline = time.time() + 60
        while time.time() < deadline and (_alive(family) or not _port_free(port)):
            time.sleep(0.5)
        assert not _alive(family) and _port_free(port)
        # and the worker alone dies with its arbiter too (kill -9 of BentoML's arbiter, not of driftloop)
        serve2 = Proc(["serve", "--port", str(port)], env, home / "serve2.log")
        try:
            serve2.wait_http(f"http://127.0.0.1:{port}/readyz")
            arbiter = next(pid for pid in _descendants(serve2.proc.pid)
                           if b"bentoml" in Path(f"/proc/{pid}/cmdline").read_bytes() and b"worker" not in Path(f"/proc/{pid}/cmdline").read_bytes())
            workers = _descendants(arbiter)
            assert workers
            os.kill(arbiter, signal.SIGKILL)
            deadline = time.time() + 60
            while time.time() < deadline and (_alive(workers) or not _port_free(port)):
                time.sleep(0.5)
            assert not _alive(workers) and _port_free(port)
        finally:
            serve2.stop()
    finally:
        serve.stop()


def test_serve_warns_when_predict_is_open_beyond_loopback(tmp_path):
    """One warning line when /predict would be open to other machines; none on loopback or with the token."""
    port = free_port()
    with socket.socket() as holder:  # a taken port makes `serve` stop right after its checks: nothing is started
        holder.bind(("0.0.0.0", port))
        holder.listen()
        home = tmp_path / "home"
        home.mkdir()
        wide = run_cli(["serve", "--host", "0.0.0.0", "--port", str(port)], home, timeout=60)
        local = run_cli(["serve", "--host", "127.0.0.1", "--port", str(port)], home, timeout=60)
        closed = run_cli(["serve", "--host", "0.0.0.0", "--port", str(port), "--require-predict-token"], home, timeout=60)
    assert wide.returncode == local.returncode == closed.returncode == 2
    assert f"port {port} is in use by pid {os.getpid()}" in wide.stderr
    warning = [line for line in wide.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "0.0.0.0" in warning[0] and "/predict" in warning[0] and "--require-predict-token" in warning[0]
    assert not [line for line in local.stderr.splitlines() if line.startswith("warning:")]
    assert not [line for line in closed.stderr.splitlines() if line.startswith("warning:")]
    # a bad commit policy is one line from `serve` itself, before anything starts
    bad = run_cli(["serve", "--port", str(port)], home, timeout=60, env={"DRIFTLOOP_DB_SYNCHRONOUS": "sometimes"})
    assert bad.returncode == 2 and bad.stderr.strip() == "error: invalid DRIFTLOOP_DB_SYNCHRONOUS='sometimes': one of normal, full"
