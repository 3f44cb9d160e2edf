"""`driftloop_*` serving metrics (prometheus-client), correct with several workers.

`bentoml serve` runs prometheus-client in multiprocess mode: counters and histograms add up across
workers; gauges need a `multiprocess_mode`; Info/Enum are unsupported, so the serving model version
is a gauge set to 1 with the version as a label ("mostrecent").
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREDICTIONS = Counter("driftloop_predictions", "Predictions served", ["model_version", "label"])
CONFIDENCE = Histogram("driftloop_prediction_confidence", "Calibrated confidence of served predictions", ["model_version"],
                       buckets=(0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
TRUNCATED = Counter("driftloop_truncated_texts", "Texts truncated to the model's max tokens", ["model_version"])
BATCH_SIZE = Histogram("driftloop_batch_size", "Texts per /predict call gathered by the adaptive batcher", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
FEEDBACK = Counter("driftloop_feedback", "Feedback labels received", ["status"])
BATCH_SECONDS = Histogram("driftloop_batch_seconds", "Time to serve one gathered /predict batch: forward passes and prediction-log commit",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
LOG_WRITE_SECONDS = Histogram("driftloop_prediction_log_write_seconds", "Time to commit one batch to the prediction log",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
LOG_WRITE_FAILURES = Counter("driftloop_prediction_log_write_failures", "Batches that could not be logged (answered 503)")
MODEL_LOADS = Counter("driftloop_model_loads", "Model load attempts by outcome", ["outcome"])
MODEL_SWAPS = Counter("driftloop_model_swaps", "Hot swaps to a new production model")
MODEL_SWAP_FAILURES = Counter("driftloop_model_swap_failures", "Failed hot swaps (the old model kept serving)")
MODEL_INFO = Gauge("driftloop_model_info", "The model version this worker serves (value 1)", ["model_version"],
                   multiprocess_mode="mostrecent")
RUNTIME_INFO = Gauge("driftloop_serving_runtime_info", "The runtime this worker serves with (value 1): torch, onnx, onnx-int8",
                     ["model_version", "runtime"], multiprocess_mode="mostrecent")
RUNTIME_FALLBACKS = Counter("driftloop_runtime_fallbacks", "Models served on another runtime than asked (int8 refused by its accuracy check)",
                            ["asked", "served"])
MODEL_LOADED_TIMESTAMP = Gauge("driftloop_model_loaded_timestamp_seconds", "When the serving model was loaded",
                               multiprocess_mode="max")


def set_serving(version: str, previous: str | None, loaded_at: float, runtime: str = "torch",
                previous_runtime: str | None = None) -> None:
    if previous and previous != version:
        MODEL_INFO.labels(model_version=previous).set(0)
        RUNTIME_INFO.labels(model_version=previous, runtime=previous_runtime or runtime).set(0)
    MODEL_INFO.labels(model_version=version).set(1)
    RUNTIME_INFO.labels(model_version=version, runtime=runtime).set(1)
    MODEL_LOADED_TIMESTAMP.set(loaded_at)
