"""What `driftloop up` runs: the service, the controller, a local Prometheus (when installed) with
the shipped alert rules, Evidently's UI over the monitor's workspace, and Label Studio (when
installed: the loop's annotation queue, driftloop/labelstudio.py), each on its own port.

Each is a child process in its own process group that dies with `driftloop up` (core/lifecycle.py:
kill -9 included); Ctrl-C or SIGTERM stops them all, service last, so no acknowledged prediction is
cut off. Every port is checked first: one in use is one line naming it and its holder. Before
starting them it makes sure the bearer tokens exist (core/tokens.py): a token generated now is
printed once; later starts print its path.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import yaml
from pydantic import TypeAdapter, ValidationError

from core import tokens
from core.errors import DriftloopError
from core.lifecycle import ensure_port_free
from driftloop import labelstudio
from driftloop.procs import Proc
from monitoring.passes import workspace_dir, workspace_project

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"


def prometheus_config(service: str, controller: str, scrape_interval: str = "15s") -> dict:
    """The shipped deploy/prometheus/prometheus.yml with its targets pointed at these host:ports."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"].update({"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval})
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / name) for name in config.get("rule_files", [])]
    config.pop("alerting", None)  # no Alertmanager locally; alerts show on Prometheus's own alerts page
    targets = {"driftloop-service": service, "driftloop-controller": controller}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


def ensure_tokens(say: Callable[[str], None]) -> None:
    """Generate the missing tokens into the home (0600) and show each new one once, never again."""
    kinds: list[tokens.Kind] = ["feedback", "admin"]
    raw = os.environ.get("DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN", "false")  # the service's setting, parsed as it parses it
    try:
        if TypeAdapter(bool).validate_python(raw):
            kinds.append("predict")
    except ValidationError:
        raise DriftloopError(f"invalid DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN: {raw!r} is not a boolean") from None
    for kind in kinds:
        if tokens.ensure(kind):
            say(f"{kind} token: {tokens.get(kind)}   (generated; shown only now, kept in {tokens.token_path(kind)})")
        elif os.environ.get(tokens.env_var(kind), "").strip():
            say(f"{kind} token: from ${tokens.env_var(kind)}")
        else:
            say(f"{kind} token: in {tokens.token_path(kind)}")
    tokens.require(kinds)  # well-formed and distinct, before anything starts


def alerts_path(url: str) -> str:
    """Prometheus's alerts page: `/alerts` upstream; Debian's build ships only the classic UI, at `/classic/alerts`."""
    for path in ("/alerts", "/classic/alerts"):
        try:
            if httpx.get(url + path, timeout=5).status_code == 200:
                return path
        except httpx.HTTPError:
            pass
    return "/alerts"


def evidently_command() -> list[str]:
    """`evidently ui` from this environment (its console script beside this Python)."""
    binary = shutil.which("evidently", path=str(Path(sys.executable).parent)) or shutil.which("evidently")
    if binary is None:
        raise DriftloopError("the evidently command is not installed in this environment (pip install -e .)")
    return [binary, "ui"]


def _check_ports(ports: list[tuple[int, str]]) -> None:
    """One clear line before anything starts: two parts on one port, or a port already taken."""
    if len({p for p, _ in ports}) < len(ports):
        raise DriftloopError("each part needs its own port: " + ", ".join(f"{what} {p}" for p, what in ports))
    for p, what in ports:
        ensure_port_free(p, "127.0.0.1", what)


class _Parts:
    """The processes `up` started, in order, so that they stop in reverse order whatever happens."""

    def __init__(self, home: Path, env: dict, say: Callable[[str], None]):
        self.home, self.env, self.say = home, env, say
        self.procs: list[tuple[str, Proc]] = []

    def start(self, name: str, proc: Proc, url: str) -> None:
        self.procs.append((name, proc))
        try:
            proc.wait_http(url)
        except (RuntimeError, TimeoutError):
            raise DriftloopError(f"{name} did not start; see {proc.log_path}") from None

    def prometheus(self, binary: str, port: int, service_port: int, controller_port: int, scrape_interval: str) -> str:
        """Prometheus scraping the service and the controller; returns its alerts page."""
        cfg_path = self.home / "prometheus.yml"
        cfg_path.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{service_port}", f"127.0.0.1:{controller_port}", scrape_interval)))
        url = f"http://127.0.0.1:{port}"
        self.start("prometheus", Proc([], self.env, self.home / "prometheus.log",
                                      cmd=[binary, f"--config.file={cfg_path}", f"--storage.tsdb.path={self.home / 'prometheus'}",
                                           f"--web.listen-address=127.0.0.1:{port}"]), f"{url}/-/ready")
        alerts = f"{url}{alerts_path(url)}"
        self.say(f"prometheus: {url}   (alerts of the shipped rules: {alerts}; graphs: {url}/graph)   log {self.home / 'prometheus.log'}")
        return alerts

    def evidently_ui(self, port: int) -> str:
        """Evidently's UI on the monitor's workspace; returns the project page."""
        _, project = workspace_project()
        url = f"http://127.0.0.1:{port}"
        self.start("evidently ui", Proc([], {**self.env, "DO_NOT_TRACK": "1"}, self.home / "evidently-ui.log",
                                        cmd=[*evidently_command(), "--workspace", str(workspace_dir()), "--host", "127.0.0.1",
                                             "--port", str(port)]), f"{url}/api/version")
        self.say(f"evidently:  {url}/projects/{project.id}   (drift tests over the monitor passes; each pass's report under "
                 f"Reports)   log {self.home / 'evidently-ui.log'}")
        return f"{url}/projects/{project.id}"

    def supervise(self, stop: dict) -> None:
        """Until Ctrl-C (or SIGTERM): a part that exits stops the rest."""
        while not stop["now"]:
            for name, p in self.procs:
                if p.proc.poll() is not None:
                    self.say(f"{name} exited with {p.proc.returncode}; stopping the rest (see its log)")
                    stop["now"] = True
            time.sleep(0.5)

    def stop_all(self) -> None:
        for name, p in reversed(self.procs):
            self.say(f"stopping {name} ...")
            p.stop()


def run(home: Path, *, port: int, controller_port: int, prometheus_port: int, ui_port: int, with_prometheus: bool,
        with_ui: bool, say: Callable[[str], None], scrape_interval: str = "15s", labels_port: int = 8080,
        with_labels: bool = True) -> None:
    """Start the stack on loopback (Label Studio first: its first boot is the slowest; then the
    service, Prometheus and Evidently's UI, then the controller, which links to them), print where
    each part is, and supervise until Ctrl-C; every part stops with it."""
    ensure_tokens(say)
    prometheus_binary = shutil.which("prometheus") if with_prometheus else None
    studio_binary = labelstudio.binary() if with_labels else None
    ports = [(port, "the service (--port)"), (controller_port, "the controller (--controller-port)")]
    ports += [(prometheus_port, "Prometheus (--prometheus-port)")] if prometheus_binary else []
    ports += [(ui_port, "the Evidently UI (--ui-port)")] if with_ui else []
    ports += [(labels_port, "Label Studio (--labels-port)")] if studio_binary else []
    _check_ports(ports)
    env = dict(os.environ)
    parts = _Parts(home, env, say)
    stop = {"now": False}

    def request_stop(*_):
        stop["now"] = True

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        studio_url = f"http://127.0.0.1:{labels_port}"
        studio = None
        if studio_binary:  # first: its first boot (database migrations) takes ~40 s, ready while the rest start
            studio = Proc([], labelstudio.environment(home, env), home / "labelstudio.log", cmd=labelstudio.command(home, labels_port))
            parts.procs.append(("label studio", studio))
        parts.start("service", Proc(["serve", "--port", str(port)], env, home / "service.log"), f"http://127.0.0.1:{port}/readyz")
        say(f"service:    http://127.0.0.1:{port}   (POST /predict, /explain; /feedback with the feedback token; GET /metrics)   "
            f"log {home / 'service.log'}")
        links: dict[str, str] = {}  # the controller's page links to Prometheus and Evidently: they start first
        if prometheus_binary:
            links["prometheus"] = parts.prometheus(prometheus_binary, prometheus_port, port, controller_port, scrape_interval)
        elif with_prometheus:
            say("prometheus: not installed (make up installs it; or apt-get install prometheus), skipped")
        if with_ui:
            links["evidently"] = parts.evidently_ui(ui_port)
        controller_args = ["controller", "--port", str(controller_port)]
        controller_args += ["--set", f"labels.studio_url={studio_url}"] if studio else []
        controller_args += [x for key, url in links.items() if url for x in ("--set", f"links.{key}={url}")]
        parts.start("controller", Proc(controller_args, env, home / "controller.log"), f"http://127.0.0.1:{controller_port}/healthz")
        say(f"controller: http://127.0.0.1:{controller_port}   (open it in a browser: the loop's story; /status as JSON, /metrics, "
            f"/reports/latest)   log {home / 'controller.log'}")
        if studio is not None:
            try:
                studio.wait_http(f"{studio_url}/health", timeout=300)
            except (RuntimeError, TimeoutError):
                raise DriftloopError(f"label studio did not start; see {studio.log_path}") from None
            say(f"labels:     {studio_url}   (Label Studio: the loop's label requests, the least sure first; user "
                f"{labelstudio.USERNAME}, password in {labelstudio.password_path()})   log {home / 'labelstudio.log'}")
        elif with_labels:
            say("labels:     Label Studio not installed (make up installs it; make labelstudio), skipped: "
                "`driftloop labels export` / `import` work without it")
        say("Ctrl-C stops everything.")
        parts.supervise(stop)
    finally:
        parts.stop_all()
        for s, handler in old.items():
            signal.signal(s, handler)
