"""Writes the Grafana dashboards (deploy/grafana/dashboards/*.json) from one readable list of panels.

    python deploy/grafana/make_dashboards.py

tests/test_observability.py runs every PromQL expression below against a real Prometheus that
scraped a real service and controller, so a renamed metric breaks a test, not a dashboard.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASOURCE = {"type": "prometheus", "uid": "driftloop-prometheus"}
REPORT_LINK = [{"title": "Latest monitor report (Evidently)", "url": "${controller_url}/reports/latest", "targetBlank": True}]

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
    out = []
    for i, (panel_title, unit, targets) in enumerate(panels):
        panel = {
            "id": i + 1, "type": "timeseries", "title": panel_title, "datasource": DATASOURCE,
            "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(65 + j), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(targets)],
        }
        if "monitor" in " ".join(t[0] for t in targets):
            panel["links"] = REPORT_LINK
        out.append(panel)
    return {
        "uid": uid, "title": title, "tags": ["driftloop"], "timezone": "utc", "schemaVersion": 39, "version": 1,
        "refresh": "30s", "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [{"name": "controller_url", "label": "Controller URL", "type": "textbox",
                                 "query": "http://localhost:3100", "current": {"value": "http://localhost:3100"}}]},
        "links": [{"title": "Latest monitor report", "url": "${controller_url}/reports/latest", "type": "link", "targetBlank": True}],
        "panels": out,
    }


def main() -> None:
    for uid, title, panels in (SERVING, QUALITY):
        path = HERE / "dashboards" / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid, title, panels), indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
