"""Evidently's project page tells the loop's story (monitoring/pass_values.py): each pass's snapshot
carries driftloop's own figures, the dashboard has a panel for each, an older project gains them
(and loses the retired p-value panel) in place, and what the UI reads back has the series."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np

READ_LIKE_THE_UI = """
import asyncio, json, sys
from evidently.ui.service.storage.local.base import LocalState, InMemoryDataStorage
from evidently.ui.service.base import SeriesFilter
state = LocalState.load(sys.argv[1], None)
data = InMemoryDataStorage(path=sys.argv[1], local_state=state)
pid = next(iter(state.projects))
def series(**labels):
    f = SeriesFilter(metric="evidently:metric_v2:PassValue", metric_labels=labels, tags=[], metadata={})
    r = asyncio.run(data.get_data_series(pid, [f], None, None))
    return {"tags": [s.tags for s in r.sources], "series": [[s.params, s.values] for s in r.series]}
print(json.dumps({"estimated": series(name="estimated_accuracy"), "p": series(name="neg_log10_p"),
                  "generation": series(name="model_generation")}))
"""


def test_passes_plot_accuracy_tests_and_generation_on_the_project_page(tmp_path, monkeypatch, registered_tiny_model, db_url):
    from core import predlog, registry
    from core.inference import load_predictor
    from core.statedb import get_engine
    from monitoring import pass_values, passes
    from monitoring.config import MonitorConfig

    monkeypatch.setattr(passes, "workspace_dir", lambda: tmp_path / "evidently")  # this test's workspace and reports
    monkeypatch.setattr(passes, "reports_dir", lambda: tmp_path / "reports")
    engine = get_engine(db_url)
    predlog.ensure_schema(engine)
    predictor = load_predictor(registered_tiny_model, device="cpu")
    texts = [f"a fine review number {i}" if i % 2 else f"a dreadful film, number {i}" for i in range(120)]
    out = predictor.predict(texts)
    names = predictor.label_names
    rows = [predlog.LoggedPrediction(f"{i:032x}", t, names[int(out.probs[i].argmax())], float(out.probs[i].max()),
                                     {n: float(out.probs[i, j]) for j, n in enumerate(names)}, out.descriptors[i], out.truncated[i],
                                     out.embeddings[i]) for i, t in enumerate(texts)]
    predlog.write_batch(engine, registered_tiny_model, rows, runtime="torch")
    config = MonitorConfig(report=True, min_samples=50, window=60)
    first = passes.monitor_once(engine, config, model_version=registered_tiny_model)
    second = passes.monitor_once(engine, config, model_version=registered_tiny_model)
    assert first.report_path and second.report_path and "estimated accuracy" in second.report_path.read_text(encoding="utf-8")

    ws, project = passes.workspace_project()
    titles = [p.title for p in project.dashboard.model().panels]
    assert titles == [p.title for p in pass_values.dashboard_panels()]
    assert pass_values.sync_dashboard(ws, project) is False, "idempotent"

    read = subprocess.run([sys.executable, "-c", READ_LIKE_THE_UI, str(passes.workspace_dir())], capture_output=True, text=True,
                          timeout=120, check=True)
    import json

    got = json.loads(read.stdout)
    (estimated,) = got["estimated"]["series"]
    assert len(estimated[1]) == 2 and all(0 < v <= 1 for v in estimated[1])
    assert [f"model={registered_tiny_model}"] in got["estimated"]["tags"]
    keys = {params["key"] for params, _ in got["p"]["series"]}
    assert {"confidence", "prediction", "alpha (one test alone)"} <= keys
    assert all(math.isfinite(v) and 0 <= v <= 16 for _, values in got["p"]["series"] for v in values)
    generation = registry.get(registered_tiny_model).lineage["data_lineage"]["generation"]
    assert got["generation"]["series"][0][1] == [float(generation)] * 2


def test_an_older_project_gains_the_panels_and_loses_the_retired_one(tmp_path):
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel
    from evidently.ui.workspace import Workspace

    from monitoring import pass_values

    ws = Workspace.create(str(tmp_path / "ws"))
    project = ws.create_project("driftloop monitor")
    project.dashboard.add_panel(line_plot_panel(title="Drift tests: p-value per monitor pass",
                                                values=[PanelMetric(legend="c", metric="ValueDrift", metric_labels={"column": "c"})]))
    project.dashboard.add_panel(line_plot_panel(title="an operator's own panel",
                                                values=[PanelMetric(legend="c", metric="ValueDrift", metric_labels={"column": "c"})]))
    assert pass_values.sync_dashboard(ws, project) is True
    titles = [p.title for p in project.dashboard.model().panels]
    assert "Drift tests: p-value per monitor pass" not in titles and "an operator's own panel" in titles
    assert set(p.title for p in pass_values.dashboard_panels()) <= set(titles)
    assert pass_values.sync_dashboard(ws, project) is False


def test_values_clip_p_and_keep_unknown_figures_as_gaps():
    import types

    from monitoring.pass_values import values

    tests = [types.SimpleNamespace(name="confidence", p_value=0.0, drift=True), types.SimpleNamespace(name="len", p_value=0.5, drift=False)]
    got = {(v.name, v.key): v.value for v in values({"estimated_accuracy": 0.9, "realized_accuracy": float("nan"),
                                                        "labelled_by_source": {"organic": 3}}, tests, 0.05, 2)}
    assert got[("neg_log10_p", "confidence")] == 16 and np.isclose(got[("neg_log10_p", "len")], -math.log10(0.5))
    assert got[("drifted_share", None)] == 0.5 and got[("labelled_rows", "organic")] == 3 and got[("model_generation", None)] == 2
    assert math.isnan(got[("realized_accuracy", None)]) and math.isnan(got[("estimation_error", None)])
