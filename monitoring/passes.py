"""A stored monitor pass: pick the serving model, read its window, test it, store and report it.

This is what `driftloop monitor --once` runs and what the controller schedules.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
from dataclasses import dataclass
from pathlib import Path

from evidently.ui.workspace import Workspace
from sqlalchemy.engine import Engine

from core import alias, predlog, registry
from core.errors import DriftloopError
from core.home import driftloop_home
from monitoring import pass_values, store, window
from monitoring.analysis import PassResult, Reference, clean, dashboard_snapshot, quality, run_pass, save_report
from monitoring.config import MonitorConfig

log = logging.getLogger("driftloop.monitor")
WORKSPACE_PROJECT = "driftloop monitor"


def reports_dir() -> Path:
    return driftloop_home() / "reports"


def workspace_dir() -> Path:
    return driftloop_home() / "evidently"


@dataclass
class StoredPass:
    run_id: int
    result: PassResult
    report_path: Path | None

    def to_json(self) -> dict:
        return {"run_id": self.run_id, **self.result.to_json(), "report_path": str(self.report_path) if self.report_path else None}


def serving_version(engine: Engine) -> str:
    """The production alias's model, else the version that logged the newest prediction."""
    state = alias.current(engine=engine)
    if state is not None:
        return state.tag
    latest = predlog.latest_model_version(engine)
    if latest is None:
        raise DriftloopError("nothing to monitor: no production model and no logged predictions")
    return latest


_reference_cache: dict[tuple[str, str], Reference] = {}


def reference_for(model_version: str, runtime: str = "torch") -> Reference:
    """A model's reference profile as `runtime` computes it (cached: registered models never change)."""
    key = (model_version, runtime)
    if key not in _reference_cache:
        _reference_cache[key] = Reference.load(model_version, runtime)
    return _reference_cache[key]


def _window_and_reference(engine: Engine, version: str, **window_args) -> tuple[window.Window, Reference]:
    """A window of `version`'s log and the reference of the runtime that computed it."""
    label_names = list(registry.get(version).lineage["label_names"])
    win = window.load(engine, version, label_names, **window_args)
    return win, reference_for(version, win.runtime)


def workspace_project() -> tuple[Workspace, object]:
    """The Evidently workspace (what `evidently ui` serves, `driftloop up` starts it) and its driftloop
    project, made on first use with a dashboard: without panels Evidently's project page is empty,
    and an operator opening it should see the drift tests over the passes at once, each pass's
    report one click away (its Reports tab)."""
    directory = workspace_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".driftloop.lock", "w") as lock:  # `up` and the controller may both be first
        fcntl.flock(lock, fcntl.LOCK_EX)
        ws = Workspace.create(str(directory))
        projects = ws.search_project(WORKSPACE_PROJECT)
        project = projects[0] if projects else ws.create_project(WORKSPACE_PROJECT,
                                                                 description="driftloop monitor passes: one report per pass")
        pass_values.sync_dashboard(ws, project)  # new, or made by an earlier version: gains the panels it lacks
    return ws, project


def _add_to_workspace(result: PassResult) -> None:
    """Append the pass's snapshot to the Evidently workspace so `evidently ui` browses the history."""
    ws, project = workspace_project()
    ws.add_run(project.id, result.snapshot, include_data=False)


def new_since_last_verdict(engine: Engine, version: str, cap: int | None = None) -> int | None:
    """Predictions of `version` logged after the window of its newest pass with a verdict (None: no
    such pass), counted up to `cap`: the scheduler only compares it with min_new_predictions."""
    store.ensure_schema(engine)
    last = store.last_verdict(engine, version)
    if last is None or last["window_last_id"] is None:
        return None
    return predlog.count_since(engine, version, last["window_last_id"], cap=cap)


def with_fresh_labels(engine: Engine, config: MonitorConfig, stored: dict) -> dict:
    """A stored pass with its quality recomputed on the same window: feedback arrives late, so the
    labels of a window keep coming after its verdict. No new drift verdict (same rows), nothing stored."""
    if not stored.get("window_size") or stored.get("window_last_id") is None:
        return stored
    win, reference = _window_and_reference(engine, stored["model_version"], last=stored["window_size"],
                                           up_to_id=stored["window_last_id"])
    return {**stored, "quality": clean(quality(reference, win, config))}


def monitor_once(engine: Engine, config: MonitorConfig, model_version: str | None = None) -> StoredPass:
    """One pass over the newest window of the serving (or given) model version, stored and reported."""
    predlog.ensure_schema(engine)
    store.ensure_schema(engine)
    version = model_version or serving_version(engine)
    since = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=config.window_seconds)) if config.window_seconds else None
    win, reference = _window_and_reference(engine, version, last=config.window, since=since)
    result = run_pass(reference, win, config)
    run_id = store.save(engine, result)
    report = None
    if config.report and result.snapshot is not None:
        try:
            generation = (registry.get(version).lineage.get("data_lineage") or {}).get("generation")
            result.snapshot = dashboard_snapshot(reference, win, result, generation)
            report = save_report(result, reports_dir(), run_id)
            store.set_report_path(engine, run_id, str(report))
            _add_to_workspace(result)
        except Exception as err:  # noqa: BLE001 - a report is for people; the stored pass is what counts
            log.warning("monitor run %s: report not written: %s: %s", run_id, type(err).__name__, err)
    log.info("monitor run %s: %s, %s predictions, drift=%s, %.2fs", run_id, version, result.window_size, result.drift, result.duration_s)
    return StoredPass(run_id, result, report)
