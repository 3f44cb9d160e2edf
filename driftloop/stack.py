"""What `driftloop up` runs: the service, the controller and (when installed) a local Prometheus.

Each is a child process in its own process group; Ctrl-C or SIGTERM stops them all, service last,
so no acknowledged prediction is cut off. Before starting them it makes sure the bearer tokens
exist (core/tokens.py): a token generated now is printed once; later starts print its path.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import yaml
from pydantic import TypeAdapter, ValidationError

from core import tokens
from core.errors import DriftloopError
from driftloop.procs import Proc

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"


def prometheus_config(service: str, controller: str, scrape_interval: str = "15s") -> dict:
    """The shipped deploy/prometheus/prometheus.yml with its targets pointed at these host:ports."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"].update({"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval})
    config["rule_files"] = [str(PROMETHEUS_CONFIG.parent / name) for name in config.get("rule_files", [])]
    config.pop("alerting", None)  # no Alertmanager locally; alerts show on Prometheus' /alerts page
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


def run(home: Path, *, port: int, controller_port: int, prometheus_port: int, with_prometheus: bool,
        say: Callable[[str], None]) -> None:
    ensure_tokens(say)
    env = dict(os.environ)
    procs: list[tuple[str, Proc]] = []
    stop = {"now": False}

    def request_stop(*_):
        stop["now"] = True

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        service = Proc(["serve", "--port", str(port)], env, home / "service.log")
        procs.append(("service", service))
        service.wait_http(f"http://127.0.0.1:{port}/readyz")
        controller = Proc(["controller", "--port", str(controller_port)], env, home / "controller.log")
        procs.append(("controller", controller))
        controller.wait_http(f"http://127.0.0.1:{controller_port}/healthz")
        say(f"service:    http://127.0.0.1:{port}   (POST /predict, /explain; /feedback with the feedback token; GET /metrics)   "
            f"log {home / 'service.log'}")
        say(f"controller: http://127.0.0.1:{controller_port}   (/status, /metrics, /reports/latest)   log {home / 'controller.log'}")
        binary = shutil.which("prometheus")
        if with_prometheus and binary:
            cfg_path = home / "prometheus.yml"
            cfg_path.write_text(yaml.safe_dump(prometheus_config(f"127.0.0.1:{port}", f"127.0.0.1:{controller_port}")))
            prom = Proc([], env, home / "prometheus.log",
                        cmd=[binary, f"--config.file={cfg_path}", f"--storage.tsdb.path={home / 'prometheus'}",
                             f"--web.listen-address=127.0.0.1:{prometheus_port}"])
            procs.append(("prometheus", prom))
            say(f"prometheus: http://127.0.0.1:{prometheus_port}   (alerts: /alerts)")
        elif with_prometheus:
            say("prometheus: not installed (apt-get install prometheus), skipped")
        say("Ctrl-C stops everything.")
        while not stop["now"]:
            for name, p in procs:
                if p.proc.poll() is not None:
                    say(f"{name} exited with {p.proc.returncode}; stopping the rest (see its log)")
                    stop["now"] = True
            time.sleep(0.5)
    finally:
        for name, p in reversed(procs):
            say(f"stopping {name} ...")
            p.stop()
        for s, handler in old.items():
            signal.signal(s, handler)

