"""Writes the Grafana dashboards (deploy/grafana/dashboards/*.json) from one readable list of panels.

    python deploy/grafana/make_dashboards.py      # needs the `dev` extra (grafana-foundation-sdk)

The panels are plain data below; `dashboard()` turns them into JSON with grafana-foundation-sdk, the
schema-typed builders Grafana generates from its own dashboard schema (pinned to the Grafana 11.2 build,
the version deploy/docker-compose.yml runs), instead of hand-written JSON whose field names and defaults
nothing checked. The output is deterministic (sorted keys, no generated ids or timestamps), and
tests/test_observability.py regenerates it and fails if the committed JSON differs.

That test file also runs every PromQL expression below against a real Prometheus that scraped a real
service and controller, so a renamed metric breaks a test, not a dashboard.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.builders import prometheus, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption

HERE = Path(__file__).resolve().parent
DATASOURCE = DataSourceRef(type_val="prometheus", uid="driftloop-prometheus")
# textbox variables (name, label, default) and the links that use them
VARIABLES = [("controller_url", "Controller URL", "http://localhost:3100"),
             ("evidently_url", "Evidently UI URL", "http://localhost:8000")]
DASHBOARD_LINKS = [("Latest monitor report", "${controller_url}/reports/latest"),
                   ("Evidently UI (drift tests over the monitor passes)", "${evidently_url}")]
REPORT_LINK = ("Latest monitor report (Evidently)", "${controller_url}/reports/latest")  # on panels reading driftloop_monitor_*

SERVING = ("driftloop-serving", "driftloop — serving", [
    ("Requests per second by endpoint and status", "req/s", [
        ("sum by (endpoint, http_response_code) (rate(bentoml_service_request_total[$__rate_interval]))", "{{endpoint}} {{http_response_code}}")]),
    ("5xx share of requests", "percentunit", [
        ('(sum(rate(bentoml_service_request_total{http_response_code=~"5.."}[$__rate_interval])) or vector(0))'
         " / sum(rate(bentoml_service_request_total[$__rate_interval]))", "5xx share")]),
    ("/predict latency", "s", [
        ('histogram_quantile(0.5, sum by (le) (rate(bentoml_service_request_duration_seconds_bucket{endpoint="/predict"}[$__rate_interval])))', "p50"),
        ('histogram_quantile(0.99, sum by (le) (rate(bentoml_service_request_duration_seconds_bucket{endpoint="/predict"}[$__rate_interval])))', "p99")]),
    ("Texts per adaptive batch (mean)", "short", [
        ("sum(rate(driftloop_batch_size_sum[$__rate_interval])) / sum(rate(driftloop_batch_size_count[$__rate_interval]))", "mean batch")]),
    ("Requests in progress", "short", [("sum(bentoml_service_request_in_progress)", "in progress")]),
    ("Prediction log commit latency (p99) and failures", "s", [
        ("histogram_quantile(0.99, sum by (le) (rate(driftloop_prediction_log_write_seconds_bucket[$__rate_interval])))", "commit p99"),
        ("sum(increase(driftloop_prediction_log_write_failures_total[$__rate_interval]))", "failed batches")]),
    ("Feedback labels per second", "short", [
        ("sum by (status) (rate(driftloop_feedback_total[$__rate_interval]))", "{{status}}")]),
    # the log's size and retention, from the controller (every controller reads the same log: max/min, not sum)
    "Prediction log",
    ("Prediction log rows", "short", [("max(driftloop_log_rows)", "rows")]),
    ("Prediction log bytes on disk and growth per day (last hour's slope)", "bytes", [
        ("max(driftloop_log_bytes)", "on disk"),
        ("max(deriv(driftloop_log_bytes[1h])) * 86400", "growth per day")]),
    ("Free space on the log's disk (SQLite; the alert fires under 10 %)", "percentunit", [
        ("min(driftloop_log_disk_free_bytes / driftloop_log_disk_size_bytes)", "free"),
        ("vector(0.10)", "DriftloopLogDiskLow level (10 %)")]),
    ("Age of the oldest row and oldest raw row, against retention", "d", [
        ("(time() - min(driftloop_log_oldest_row_timestamp_seconds)) / 86400", "oldest row"),
        ("(time() - min(driftloop_log_oldest_raw_row_timestamp_seconds)) / 86400", "oldest raw row (text, embedding)"),
        ("max(driftloop_log_retention_seconds) / 86400", "retention.days"),
        ("max(driftloop_log_raw_retention_seconds) / 86400", "retention.raw_days")]),
    ("Rows pending compaction (past raw_days: held or not yet compacted)", "short", [
        ("max(driftloop_log_rows_pending_compaction)", "pending")]),
    ("Retention: rows compacted and deleted per second", "short", [
        ("sum by (action) (rate(driftloop_log_retention_rows_total[$__rate_interval]))", "{{action}}")]),
    ("Retention runs per hour by outcome", "short", [
        ("sum by (outcome) (increase(driftloop_log_retention_runs_total[1h]))", "{{outcome}}")]),
])

QUALITY = ("driftloop-model", "driftloop — model, drift and loop", [
    ("Serving model version", "short", [("max by (model_version) (driftloop_model_info)", "{{model_version}}")]),
    ("Predictions per second by model version and label", "short", [
        ("sum by (model_version, label) (rate(driftloop_predictions_total[$__rate_interval]))", "{{model_version}} {{label}}")]),
    ("Median confidence by model version", "percentunit", [
        ("histogram_quantile(0.5, sum by (le, model_version) (rate(driftloop_prediction_confidence_bucket[$__rate_interval])))", "{{model_version}}")]),
    ("Drift tests: p-value against threshold (drill down: latest report)", "short", [
        ("driftloop_monitor_test_p_value", "p {{test}}"),
        ("driftloop_monitor_test_threshold", "threshold {{test}}")]),
    ("Window drift verdict and consecutive drifted windows", "short", [
        ("driftloop_monitor_drift", "drift"),
        ("driftloop_monitor_drift_consecutive_windows", "consecutive")]),
    ("Realized vs estimated accuracy (95 % bounds) and reference", "percentunit", [
        ('driftloop_monitor_accuracy_ratio{bound="point"}', "{{kind}}"),
        ('driftloop_monitor_accuracy_ratio{bound!="point"}', "{{kind}} {{bound}}"),
        ("driftloop_monitor_reference_accuracy_ratio", "reference (validation)")]),
    ("Window size and labelled predictions", "short", [
        ("driftloop_monitor_window_predictions", "window"),
        ("driftloop_monitor_labelled_predictions", "labelled")]),
    ("Monitor pass age and duration", "s", [
        ("time() - driftloop_monitor_last_pass_timestamp_seconds", "since last pass"),
        ("driftloop_monitor_last_pass_duration_seconds", "last pass duration")]),
    ("Loop events (last hour)", "short", [
        ("sum(increase(driftloop_model_swaps_total[1h]))", "hot swaps"),
        ("sum(increase(driftloop_model_swap_failures_total[1h]))", "failed swaps"),
        ("sum by (outcome) (increase(driftloop_controller_retrains_total[1h]))", "retrains {{outcome}}"),
        ("sum(increase(driftloop_controller_promotions_total[1h]))", "promotions"),
        ("sum(increase(driftloop_controller_rollbacks_total[1h]))", "rollbacks")]),
])


def dashboard(uid: str, title: str, panels: list) -> dict:
    """The dashboard's JSON model: timeseries panels, two per row (w 12, h 8; the builder places them);
    a plain string in `panels` starts a titled row holding the panels after it (an expanded row: its
    panels follow it at the top level, as Grafana itself saves them)."""
    board = (gdash.Dashboard(title).uid(uid).tags(["driftloop"]).timezone("utc").refresh("30s")
             .time("now-6h", "now").version(1)
             .variables([gdash.TextBoxVariable(name).label(label).default_value(default)
                         .current(VariableOption(text=default, value=default)) for name, label, default in VARIABLES])
             .links([gdash.DashboardLink(text).url(url).target_blank(True) for text, url in DASHBOARD_LINKS]))
    for i, entry in enumerate(panels):
        if isinstance(entry, str):
            board.with_row(gdash.Row(entry).id(i + 1))
            continue
        panel_title, unit, targets = entry
        panel = (timeseries.Panel().id(i + 1).title(panel_title).datasource(DATASOURCE).unit(unit).height(8).span(12)
                 .targets([prometheus.Dataquery().ref_id(chr(65 + j)).datasource(DATASOURCE).expr(expr).legend_format(legend)
                           for j, (expr, legend) in enumerate(targets)]))
        if "monitor" in " ".join(t[0] for t in targets):
            panel.links([gdash.DashboardLink(REPORT_LINK[0]).url(REPORT_LINK[1]).target_blank(True)])
        board.with_panel(panel)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "dashboards"  # a directory: the test compares
    for uid, title, panels in (SERVING, QUALITY):
        path = out / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid, title, panels), sort_keys=True, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
