"""A real Label Studio (its own environment: `make labelstudio`), started once for the session on
loopback: requests go out as tasks with the model's guess, answers come back by webhook (secret
header checked) and by polling, duplicates, changes, skips and late answers are handled, and Label
Studio killed mid-run leaves requests queued and loses nothing once it is back."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from tests.conftest import SESSION_HOME

LABELS = ["negative", "positive"]
UTC = dt.timezone.utc


class StudioProcess:
    def __init__(self):
        from driftloop import labelstudio
        from driftloop.procs import Proc, free_port

        self.home = SESSION_HOME / "studio"
        self.home.mkdir(exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._make = lambda: Proc([], labelstudio.environment(self.home), self.home / "labelstudio.log",
                                  cmd=labelstudio.command(self.home, self.port))
        self.proc = None

    def start(self, timeout: float = 300) -> "StudioProcess":
        self.proc = self._make()
        self.proc.wait_http(f"{self.url}/health", timeout=timeout)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@pytest.fixture(scope="session")
def studio_process():
    from driftloop import labelstudio

    if labelstudio.binary() is None:
        if os.environ.get("CI"):
            pytest.fail("Label Studio is not installed: CI must run `make labelstudio` (make test does)")
        pytest.skip("Label Studio not installed (make labelstudio)")
    proc = StudioProcess().start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def model_tag(registered_tiny_model) -> str:
    return registered_tiny_model


def _rows(n: int, start: int):
    from core.descriptors import DESCRIPTOR_COLUMNS
    from core.predlog import LoggedPrediction

    rng = np.random.default_rng(start)
    return [LoggedPrediction(request_id=f"{start + i:032x}", text=f"customer text number {start + i}", label="positive",
                             confidence=float(c), probs={"negative": 1 - float(c), "positive": float(c)},
                             descriptors=dict.fromkeys(DESCRIPTOR_COLUMNS, 1.0), truncated=False,
                             embedding=rng.normal(size=8).astype(np.float32)) for i, c in enumerate(rng.uniform(0.5, 1, n))]


class Controller:
    """The controller's HTTP app (its /labels/webhook route) served by uvicorn in a thread."""

    def __init__(self, engine):
        from driftloop.procs import free_port
        from loop import controller
        from monitoring import store

        store.ensure_schema(engine)
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(controller.build_app(engine, controller.MetricsRefresher(engine)),
                                                    host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        self.webhook = f"http://127.0.0.1:{self.port}/labels/webhook"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _annotate(studio, task_id: int, label: str | None, skip: bool = False) -> dict:
    body = {"result": [] if skip else [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}],
            "was_cancelled": skip, "lead_time": 1.0}
    response = httpx.post(f"{studio.url}/api/tasks/{task_id}/annotations/", json=body, timeout=30, headers=_auth())
    response.raise_for_status()
    return response.json()


def _auth() -> dict:
    from core import tokens

    return {"Authorization": f"Token {tokens.get('labelstudio')}"}


def _wait(predicate, timeout: float = 20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    return predicate()


def test_requests_go_out_as_tasks_and_answers_come_back(studio_process, db_url, model_tag):
    from sqlalchemy import select

    from core import predlog, tokens
    from core.statedb import get_engine
    from labels import requests, studio
    from labels.config import LabelsConfig
    from loop import labeling

    engine = get_engine(db_url)
    predlog.ensure_schema(engine)
    predlog.write_batch(engine, model_tag, _rows(30, 0))
    config = LabelsConfig(studio_url=studio_process.url, studio_project="driftloop-test")
    requests.create(engine, [requests.Candidate(i, f"{i - 1:032x}") for i in range(1, 9)], model_version=model_tag, kind="random",
                    purpose="confirmation", reason="test", config=config)
    requests.create(engine, [requests.Candidate(i, f"{i - 1:032x}") for i in range(9, 13)], model_version=model_tag, kind="informative",
                    purpose="training", reason="test", config=config)
    secret = tokens.require(["labels"])["labels"]
    client = studio.Studio(studio_process.url, tokens.get("labelstudio"))
    controller = Controller(engine)
    try:
        first = studio.sync(engine, client, config, controller.webhook, secret, label_names=None)
        assert first["sent"] == 12 and requests.summary(engine, config)["sent"] == 12
        # the tasks carry the request id and the model's calibrated guess with its score
        project = client.project_for(LABELS, config.studio_project)
        tasks = httpx.get(f"{studio_process.url}/api/projects/{project}/tasks", params={"page_size": 100}, headers=_auth(),
                          timeout=30).json()
        tasks = tasks.get("tasks", tasks) if isinstance(tasks, dict) else tasks
        by_request = {t["data"]["request_id"]: t["id"] for t in tasks}
        assert set(by_request) == {f"{i:032x}" for i in range(12)}
        details = httpx.get(f"{studio_process.url}/api/tasks/{by_request[f'{0:032x}']}", headers=_auth(), timeout=30).json()
        (guess,) = details["predictions"]
        assert guess["model_version"] == model_tag and guess["result"][0]["value"]["choices"] == ["positive"]
        assert guess["score"] == pytest.approx(_rows(1, 0)[0].confidence, abs=1e-5)

        # the webhook refuses calls without the secret
        assert httpx.post(controller.webhook, json={"action": "ANNOTATION_CREATED"}, timeout=10).status_code == 401
        assert httpx.post(controller.webhook, json={}, headers={studio.SECRET_HEADER: "x" * 40}, timeout=10).status_code == 401

        # an annotator answers: a label, a skip, a changed answer, the same answer twice (webhook: pushed at once)
        _annotate(studio_process, by_request[f"{0:032x}"], "negative")
        _annotate(studio_process, by_request[f"{1:032x}"], None, skip=True)
        changed = _annotate(studio_process, by_request[f"{8:032x}"], "negative")
        httpx.patch(f"{studio_process.url}/api/annotations/{changed['id']}/", headers=_auth(), timeout=30,
                    json={"result": [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": ["positive"]}}]}
                    ).raise_for_status()
        c = predlog.predictions.c

        def row(i):
            with engine.connect() as conn:
                return conn.execute(select(c.feedback_label, c.feedback_source, c.feedback_annotator)
                                    .where(c.request_id == f"{i:032x}")).one()

        assert _wait(lambda: row(0).feedback_label == "negative"), "the webhook delivered the answer"
        assert tuple(row(0))[:2] == ("negative", "requested-random") and row(0).feedback_annotator.startswith("labelstudio:user")
        assert _wait(lambda: row(8).feedback_label == "positive") and row(8).feedback_source == "requested-informative"
        assert _wait(lambda: requests.lookup(engine, f"{1:032x}")["status"] == "skipped") and row(1).feedback_label is None

        # polling catches what no webhook delivered (controller gone), and re-reading answers changes nothing
        controller.stop()
        _annotate(studio_process, by_request[f"{2:032x}"], "positive")
        polled = studio.sync(engine, client, config, label_names=None)
        assert polled["recorded"] == polled["answers_polled"] == 1 and row(2).feedback_label == "positive"
        again = studio.sync(engine, client, config, label_names=None)  # answered requests are not polled again
        assert again["answers_polled"] == again["recorded"] == again["replaced"] == 0

        # Label Studio killed mid-run: the sync fails fast, requests stay queued, nothing is lost
        studio_process.stop()
        predlog.write_batch(engine, model_tag, _rows(5, 100))
        requests.create(engine, [requests.Candidate(31 + i, f"{100 + i:032x}") for i in range(5)], model_version=model_tag,
                        kind="random", purpose="confirmation", reason="while down", config=config)
        started = time.monotonic()
        assert labeling.sync_job(config.model_dump()) is None
        assert time.monotonic() - started < 15 and labeling.tool_state()["up"] is False
        assert requests.summary(engine, config)["pending"] == 5
        with pytest.raises(studio.StudioUnavailable, match="unreachable"):
            studio.sync(engine, client, config, label_names=None)
        # back (same data): the queued requests go out, the earlier answers are still there
        studio_process.start(timeout=120)
        resumed = studio.sync(engine, client, config, label_names=None)
        assert resumed["sent"] == 5 and requests.summary(engine, config)["pending"] == 0
        assert row(0).feedback_label == "negative"
    finally:
        controller.stop()
        if studio_process.proc is None:
            studio_process.start(timeout=120)


def test_late_answers_are_taken_after_expiry(studio_process, db_url, model_tag):
    from core import predlog, tokens
    from core.statedb import get_engine
    from labels import requests, studio
    from labels.config import LabelsConfig

    engine = get_engine(db_url)
    predlog.ensure_schema(engine)
    predlog.write_batch(engine, model_tag, _rows(3, 500))
    config = LabelsConfig(studio_url=studio_process.url, studio_project="driftloop-late", request_ttl_h=1)
    requests.create(engine, [requests.Candidate(1, f"{500:032x}")], model_version=model_tag, kind="random", purpose="confirmation",
                    reason="t", config=config, now=dt.datetime.now(UTC) - dt.timedelta(minutes=30))
    client = studio.Studio(studio_process.url, tokens.get("labelstudio"))
    assert studio.sync(engine, client, config, label_names=None)["sent"] == 1
    task = int(requests.lookup(engine, f"{500:032x}")["task_id"])
    later = dt.datetime.now(UTC) + dt.timedelta(hours=2)
    assert requests.expire(engine, config, later) == 1
    _annotate(studio_process, task, "negative")
    result = studio.sync(engine, client, config, label_names=None)
    assert result["recorded"] == 1 and requests.lookup(engine, f"{500:032x}")["status"] == "answered"


def test_the_project_page_shows_the_queue_with_the_models_guesses(studio_process, db_url, model_tag):
    """Label Studio's project page, opened in headless Chromium as the annotator would (logged in):
    the queued tasks with their texts and the model's predictions. The README's screenshot."""
    from core import predlog, tokens
    from core.statedb import get_engine
    from driftloop import labelstudio
    from labels import requests, studio
    from labels.config import LabelsConfig
    from tests import browser

    if browser.chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium-headless-shell is not installed: make test installs it")
        pytest.skip("chromium-headless-shell not installed (make chromium)")
    engine = get_engine(db_url)
    predlog.ensure_schema(engine)
    texts = ["Quarterly profit fell short of forecasts as costs rose.", "The company raised its dividend for the third year.",
             "Shares slid after the regulator opened an inquiry.", "Net sales grew 12 % on strong export demand."]
    rows = _rows(len(texts), 900)
    for row, text in zip(rows, texts):
        row.text = text
    predlog.write_batch(engine, model_tag, rows)
    config = LabelsConfig(studio_url=studio_process.url, studio_project="driftloop-queue")
    requests.create(engine, [requests.Candidate(i + 1, r.request_id) for i, r in enumerate(rows)], model_version=model_tag,
                    kind="random", purpose="confirmation", reason="drift in monitor run 3", config=config)
    client = studio.Studio(studio_process.url, tokens.get("labelstudio"))
    assert studio.sync(engine, client, config)["sent"] == len(texts)
    project = client.project_for(LABELS, config.studio_project)
    cookies = browser.label_studio_login(studio_process.url, labelstudio.USERNAME, labelstudio.password())
    text, png = browser.open_page(f"{studio_process.url}/projects/{project}/data", cookies, settle_s=10)
    for sentence in texts:
        assert sentence[:30] in text, text[-2000:]
    assert "driftloop-queue" in text and "least sure first" in text, text[-2000:]  # the project and its queue view
    scores = [f"{r.confidence:.2f}" for r in rows]
    assert sum(score in text for score in scores) >= 3, (scores, text[-2000:])  # the model's scores, shown beside its guesses
    assert len(png) > 10_000
    browser.keep_screenshot(png, "labelstudio-queue.png")


def test_with_label_studio_down_the_controller_monitors_and_says_so(home, tiny_model_dir, monkeypatch):
    """Label Studio unreachable from the start (its port closed): the controller's scheduled passes
    go on, the sync fails fast, and /status and /metrics say since when; requests stay queued."""
    from core import tokens
    from driftloop.procs import Proc, free_port

    monkeypatch.setenv("DRIFTLOOP_HOME", str(home))
    tokens.ensure("labelstudio")  # as `driftloop up` made it when it first started Label Studio
    from tests.conftest import DEMO, cli_json
    from tests.traffic import log_traffic

    tag = cli_json(["train", "--data", "demo:reviews", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "120",
                    "--quiet", "--promote", "always", "--set", "report=false"], home)["model"]
    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    for key in ("BENTOML_HOME", "DRIFTLOOP_DB_URL"):
        env.pop(key, None)
    markets = [line.rsplit("\t", 1)[0] for line in (DEMO / "markets.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    log_traffic(env, tag, [(t, 0) for t in markets[:150]])
    port, dead = free_port(), free_port()
    controller = Proc(["controller", "--port", str(port), "--monitor-interval", "1", "--window", "100", "--min-samples", "50",
                       "--set", "monitor.min_new_predictions=20", "--set", "monitor.report=false",
                       "--set", f"labels.studio_url=http://127.0.0.1:{dead}", "--set", "labels.sync_interval_s=1"],
                      env, home / "controller.log")
    try:
        controller.wait_http(f"http://127.0.0.1:{port}/healthz")
        base = f"http://127.0.0.1:{port}"

        def state():
            status = httpx.get(f"{base}/status", timeout=10).json()
            return status if status["labels"]["tool"]["up"] is False and status["last_monitor_pass"] else None

        status = _wait(state, timeout=90)
        assert status, (home / "controller.log").read_text()[-3000:]
        assert status["labels"]["tool"]["down_since"] and "unreachable" in status["labels"]["tool"]["last_error"]
        runs = status["last_monitor_pass"]["run_id"]
        log_traffic(env, tag, [(t, 0) for t in markets[150:200]])  # more traffic: monitoring goes on
        assert _wait(lambda: httpx.get(f"{base}/status", timeout=10).json()["last_monitor_pass"]["run_id"] > runs, timeout=60)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert "driftloop_labels_tool_up 0.0" in metrics
        errors = [line for line in metrics.splitlines() if line.startswith("driftloop_labels_sync_errors_total ")]
        assert errors and float(errors[0].split()[-1]) >= 1
        log = (home / "controller.log").read_text()
        assert log.count("Label Studio unreachable") == 1, "one line per change of state, not one per sync"
    finally:
        controller.stop()


@pytest.mark.parametrize("value, kept", [("", False), ("  ", False), ("on", False), ("true", True), ("1", True)])
def test_a_ci_variable_label_studio_cannot_parse_is_not_passed_on(value, kept, tmp_path, monkeypatch):
    """Label Studio parses $CI as a strict boolean and will not start on anything else ("CI=" included)."""
    from driftloop import labelstudio

    monkeypatch.setenv("DRIFTLOOP_HOME", str(tmp_path))
    env = labelstudio.environment(tmp_path, base={"CI": value, "PATH": os.environ.get("PATH", "")})
    assert ("CI" in env) is kept and env["LABEL_STUDIO_BASE_DATA_DIR"] == str(labelstudio.data_dir(tmp_path))
