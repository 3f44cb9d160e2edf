"""The controller's Prometheus metrics: every monitor pass, as numbers operators can alert on.

Names follow Prometheus conventions: a `driftloop_monitor_` prefix, base units (`_seconds`, `_ratio`
for 0-1 values), `_total` for counters. Each controller is one process, so this is a plain registry
(no multiprocess mode) served on its own `/metrics`. Several controllers may share one state DB: the
monitor gauges are read from the DB (the same on each); `driftloop_controller_leader` says which
one holds the leader lease and runs the jobs.
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

TEST_STATISTIC = Gauge("driftloop_monitor_test_statistic", "Test statistic of a drift test in the last pass (p-value for Evidently's tests, MMD² for embeddings)",
                       ["test", "kind", "method"], registry=REGISTRY)
TEST_P_VALUE = Gauge("driftloop_monitor_test_p_value", "p-value of a drift test in the last pass", ["test", "kind", "method"], registry=REGISTRY)
TEST_THRESHOLD = Gauge("driftloop_monitor_test_threshold", "Holm-Bonferroni threshold the test's p-value was held against",
                       ["test", "kind", "method"], registry=REGISTRY)
TEST_DRIFT = Gauge("driftloop_monitor_test_drift", "1 if the test rejected (drift) in the last pass, else 0", ["test", "kind", "method"], registry=REGISTRY)
TEST_SAMPLES = Gauge("driftloop_monitor_test_samples", "Rows the test compared", ["test", "kind", "method", "side"], registry=REGISTRY)

DRIFT = Gauge("driftloop_monitor_drift", "1 if the last pass's window drifted (decision rule: Holm at alpha), else 0", registry=REGISTRY)
DRIFT_CONSECUTIVE = Gauge("driftloop_monitor_drift_consecutive_windows", "Consecutive passes of the serving model whose window drifted", registry=REGISTRY)
ALPHA = Gauge("driftloop_monitor_alpha_ratio", "Family-wise false-alarm rate of one pass", registry=REGISTRY)
WINDOW_SIZE = Gauge("driftloop_monitor_window_predictions", "Predictions in the last pass's window", registry=REGISTRY)
LABELLED = Gauge("driftloop_monitor_labelled_predictions", "Predictions with feedback labels in the last pass's window", registry=REGISTRY)
ACCURACY = Gauge("driftloop_monitor_accuracy_ratio", "Accuracy of the serving model in the last window: realized (feedback) or estimated (calibrated confidence)",
                 ["kind", "bound"], registry=REGISTRY)
F1_MACRO = Gauge("driftloop_monitor_f1_macro_ratio", "Realized macro-F1 in the last window, with bootstrap 95 % bounds", ["bound"], registry=REGISTRY)
ESTIMATION_ERROR = Gauge("driftloop_monitor_estimation_error_ratio", "Estimated minus realized accuracy on the window's labelled rows", registry=REGISTRY)
REFERENCE_ACCURACY = Gauge("driftloop_monitor_reference_accuracy_ratio", "The serving model's accuracy on its validation data", registry=REGISTRY)
MODEL_INFO = Gauge("driftloop_monitor_model_info", "The model version the last pass monitored (value 1)", ["model_version"], registry=REGISTRY)
LAST_PASS = Gauge("driftloop_monitor_last_pass_timestamp_seconds", "Unix time the last monitor pass finished", registry=REGISTRY)
LAST_DURATION = Gauge("driftloop_monitor_last_pass_duration_seconds", "Duration of the last monitor pass", registry=REGISTRY)
PASS_DURATION = Histogram("driftloop_monitor_pass_duration_seconds", "Duration of monitor passes",
                          buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0), registry=REGISTRY)
PASSES = Counter("driftloop_monitor_passes_total", "Monitor passes by outcome (ok, insufficient, no_new_data: skipped, too few new predictions since the last verdict; error)", ["outcome"], registry=REGISTRY)
RETRAINS = Counter("driftloop_controller_retrains", "Refinement fine-tunes by outcome (started, succeeded, failed)", ["outcome"], registry=REGISTRY)
PROMOTIONS = Counter("driftloop_controller_promotions", "Challengers promoted to production by the controller", registry=REGISTRY)
ROLLBACKS = Counter("driftloop_controller_rollbacks", "Automatic rollbacks of a new champion", registry=REGISTRY)
LEADER = Gauge("driftloop_controller_leader", "1 if this controller holds the leader lease (runs the scheduled jobs), 0 on a standby",
               registry=REGISTRY)
LEADER_CHANGES = Counter("driftloop_controller_leader_changes", "Times this controller became (elected) or stopped being (demoted) the leader",
                         ["event"], registry=REGISTRY)
MONITOR_JOBS = Counter("driftloop_controller_monitor_jobs", "Scheduled monitor passes this controller's scheduler ran (only a leader runs them)",
                       registry=REGISTRY)
UP_SINCE = Gauge("driftloop_controller_start_time_seconds", "Unix time the controller started", registry=REGISTRY)

for _outcome in ("ok", "insufficient", "no_new_data", "error"):
    PASSES.labels(outcome=_outcome)
for _outcome in ("started", "succeeded", "failed"):
    RETRAINS.labels(outcome=_outcome)
for _event in ("elected", "demoted"):
    LEADER_CHANGES.labels(event=_event)
LEADER.set(0)


def _set(gauge, value, **labels) -> None:
    target = gauge.labels(**labels) if labels else gauge
    target.set(float("nan") if value is None else float(value))


def publish(result: dict, finished_at: float, consecutive: int) -> None:
    """Set every gauge from one stored pass (`store.latest()` / `StoredPass.to_json()` layout)."""
    TEST_STATISTIC.clear(); TEST_P_VALUE.clear(); TEST_THRESHOLD.clear(); TEST_DRIFT.clear(); TEST_SAMPLES.clear()  # noqa: E702
    for t in result.get("tests", []):
        key = {"test": t["name"], "kind": t["kind"], "method": t["method"]}
        _set(TEST_STATISTIC, t["statistic"], **key)
        _set(TEST_P_VALUE, t["p_value"], **key)
        _set(TEST_THRESHOLD, t["threshold"], **key)
        _set(TEST_DRIFT, 1 if t["drift"] else 0, **key)
        _set(TEST_SAMPLES, t["n_reference"], side="reference", **key)
        _set(TEST_SAMPLES, t["n_current"], side="current", **key)
    if result.get("drift") is not None:
        DRIFT.set(1 if result["drift"] else 0)
    DRIFT_CONSECUTIVE.set(consecutive)
    ALPHA.set(result.get("alpha", math.nan))
    WINDOW_SIZE.set(result.get("window_size", 0))
    q = result.get("quality") or {}
    LABELLED.set(q.get("labelled", 0) or 0)
    for kind in ("realized", "estimated"):
        for bound, suffix in (("point", ""), ("lower", "_lower"), ("upper", "_upper")):
            _set(ACCURACY, q.get(f"{kind}_accuracy{suffix}"), kind=kind, bound=bound)
    for bound, suffix in (("point", ""), ("lower", "_lower"), ("upper", "_upper")):
        _set(F1_MACRO, q.get(f"realized_f1_macro{suffix}"), bound=bound)
    _set(ESTIMATION_ERROR, q.get("estimation_error"))
    _set(REFERENCE_ACCURACY, (result.get("reference") or {}).get("accuracy"))
    MODEL_INFO.clear()
    MODEL_INFO.labels(model_version=result.get("model_version", "")).set(1)
    LAST_PASS.set(finished_at)
    _set(LAST_DURATION, result.get("duration_s"))


# ---- the prediction log's size and retention (core/retention.py), read at every scrape
LOG_ROWS = Gauge("driftloop_log_rows", "Rows in the prediction log (SQLite: the id span; Postgres: the planner's estimate)", registry=REGISTRY)
LOG_BYTES = Gauge("driftloop_log_bytes", "Bytes the prediction log takes on disk (SQLite: the state DB file and its WAL; Postgres: every partition)",
                  registry=REGISTRY)
LOG_OLDEST = Gauge("driftloop_log_oldest_row_timestamp_seconds", "Unix time of the oldest row in the prediction log", registry=REGISTRY)
LOG_OLDEST_RAW = Gauge("driftloop_log_oldest_raw_row_timestamp_seconds", "Unix time of the oldest row that still holds its text or embedding",
                       registry=REGISTRY)
LOG_PENDING = Gauge("driftloop_log_rows_pending_compaction", "Rows older than retention.raw_days that still hold text or embedding (held or not yet compacted)",
                    registry=REGISTRY)
LOG_DISK_FREE = Gauge("driftloop_log_disk_free_bytes", "Free bytes on the file system of the SQLite state DB (NaN on Postgres)", registry=REGISTRY)
LOG_DISK_SIZE = Gauge("driftloop_log_disk_size_bytes", "Size of the file system of the SQLite state DB (NaN on Postgres)", registry=REGISTRY)
LOG_RAW_DAYS = Gauge("driftloop_log_raw_retention_seconds", "retention.raw_days of the controller, in seconds", registry=REGISTRY)
LOG_DAYS = Gauge("driftloop_log_retention_seconds", "retention.days of the controller, in seconds", registry=REGISTRY)
RETENTION_RUNS = Counter("driftloop_log_retention_runs", "Retention runs by outcome (ok, partial: stopped at max_run_s, error)", ["outcome"],
                         registry=REGISTRY)
RETENTION_ROWS = Counter("driftloop_log_retention_rows", "Rows retention compacted (text and embedding dropped) or deleted", ["action"],
                         registry=REGISTRY)
RETENTION_LAST = Gauge("driftloop_log_retention_last_run_timestamp_seconds", "Unix time the last retention run finished", registry=REGISTRY)
for _outcome in ("ok", "partial", "error"):
    RETENTION_RUNS.labels(outcome=_outcome)
for _action in ("compacted", "deleted"):
    RETENTION_ROWS.labels(action=_action)


def _timestamp(iso: str | None) -> float:
    import datetime as dt  # noqa: PLC0415

    return dt.datetime.fromisoformat(iso).timestamp() if iso else math.nan


def publish_log_stats(stats: dict) -> None:
    """Set the log's gauges from `core.retention.stats()`."""
    LOG_ROWS.set(stats["rows"])
    _set(LOG_BYTES, stats.get("bytes"))
    LOG_OLDEST.set(_timestamp(stats.get("oldest_at")))
    LOG_OLDEST_RAW.set(_timestamp(stats.get("oldest_raw_at")))
    LOG_PENDING.set(stats["pending_compaction"])
    LOG_RAW_DAYS.set(stats["raw_days"] * 86400)
    LOG_DAYS.set(stats["days"] * 86400)
    _set(LOG_DISK_FREE, stats.get("disk_free_bytes"))  # NaN on Postgres: the server's disk is the server's to watch
    _set(LOG_DISK_SIZE, stats.get("disk_total_bytes"))


# ---- label requests (labels/, loop/labeling.py)
LABELS_REQUESTS = Gauge("driftloop_labels_requests", "Label requests by kind (random, informative) and status "
                        "(pending, sent, answered, skipped, expired)", ["kind", "status"], registry=REGISTRY)
LABELS_BUDGET_LEFT = Gauge("driftloop_labels_budget_left_today", "Label requests the daily budget still allows in the last 24 h",
                           registry=REGISTRY)
LABELS_ASKED_24H = Gauge("driftloop_labels_asked_last_24h", "Label requests created in the last 24 h", registry=REGISTRY)
LABELS_TOOL_UP = Gauge("driftloop_labels_tool_up", "1 if the last sync reached Label Studio, 0 if not (requests queue)", registry=REGISTRY)
LABELS_SYNC_ERRORS = Counter("driftloop_labels_sync_errors", "Sync rounds that could not reach Label Studio", registry=REGISTRY)
LABELS_ANSWERS = Counter("driftloop_labels_answers", "Answers to label requests taken in, by outcome", ["status"], registry=REGISTRY)
LABELS_TOOL_UP.set(math.nan)
for _status in ("recorded", "replaced", "unchanged", "skipped"):
    LABELS_ANSWERS.labels(status=_status)


def publish_labels(summary: dict) -> None:
    """Set the label gauges from `labels.requests.summary()`."""
    for kind, counts in summary["by_kind"].items():
        for status, n in counts.items():
            LABELS_REQUESTS.labels(kind=kind, status=status).set(n)
    LABELS_BUDGET_LEFT.set(summary["budget_left_today"])
    LABELS_ASKED_24H.set(summary["asked_last_24h"])
