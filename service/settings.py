"""Service settings, typed, from `DRIFTLOOP_SERVICE_*` environment variables (sane defaults).

`driftloop serve` sets them from its flags; `bentoml serve service.service:Classifier` reads the
same variables, so both start the same service.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from core.errors import DriftloopError

PREFIX = "DRIFTLOOP_SERVICE_"


class ServiceSettings(BaseModel):
    workers: int = Field(1, ge=1, le=64, description="Server worker processes (each holds its own model copy).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    runtime: Literal["torch", "onnx", "onnx-int8"] = Field("onnx", description=(  # = core.runtimes.DEFAULT_RUNTIME (not imported: it loads torch)
        "torch | onnx (ONNX Runtime fp32) | onnx-int8 (dynamic int8, accuracy-gated), core/runtimes.py. Default onnx, "
        "by measurement (docs/benchmarks.md): 1.8x torch's req/s at 32 clients with the same probabilities and embeddings "
        "(1e-4). onnx-int8 is 2.6x torch for -0.12 pt on SST-2; its probabilities move (0.013 mean, 0.11 max on "
        "SST-2), so the monitor tests its traffic against a reference profiled with int8 itself (each logged row "
        "says which runtime computed it). The loop's gate and bake score models on the same runtime."))
    int8_tolerance_pt: float = Field(0.5, ge=0, le=100, description=(
        "onnx-int8 serves only within this many accuracy points of fp32 on the model's held-out rows; else fp32 ONNX serves."))
    max_texts_per_request: int = Field(64, ge=1, le=4096)
    max_chars: int = Field(5000, ge=1, description="Texts longer than this are refused (422).")
    store_text: bool = Field(True, description="False: log a sha256 of each text instead (unusable for retraining).")
    log_predictions: bool = Field(True, description="False only to measure the log's cost (bench/serve.py): nothing is logged.")
    db_lock_timeout_s: float = Field(2.0, gt=0, le=60, description=(
        "How long a prediction-log or feedback write waits for a locked state DB before the request is "
        "answered 503 (nothing served, nothing lost)."))
    reload_interval_s: float = Field(2.0, gt=0, description="How often each worker polls the production alias.")
    max_batch_size: int = Field(64, ge=2, description="Most texts BentoML's adaptive batcher gathers into one call.")
    forward_batch_size: int = Field(0, ge=0, description=(
        "Texts per forward pass inside a gathered batch, sorted by length so each pass pads little. "
        "0 = auto: 8 on CPU (measured best for gathered batches of 32-64 on 2 cores, docs/benchmarks.md), 128 on GPU."))
    max_latency_ms: int = Field(30_000, ge=10, description="BentoML's batching deadline; generous so load queues instead of 503s.")
    warmup_texts: int = Field(8, ge=0)
    explain_max_chars: int = Field(1000, ge=1, description="/explain refuses longer texts (422).")
    explain_max_words: int = Field(64, ge=1, description="/explain refuses texts with more words.")
    require_predict_token: bool = Field(False, description=(
        "True: /predict and /explain need the predict token (DRIFTLOOP_PREDICT_TOKEN or $DRIFTLOOP_HOME/secrets/predict.token). "
        "/feedback and /admin/* always need their own tokens."))

    def forward_batch_for(self, device_type: str) -> int:
        """The forward batch size to use on a device of this type (`cpu`, `cuda`, ...)."""
        if self.forward_batch_size:
            return self.forward_batch_size
        return 8 if device_type == "cpu" else 128

    @classmethod
    def from_env(cls) -> "ServiceSettings":
        raw = {name: os.environ[PREFIX + name.upper()] for name in cls.model_fields if PREFIX + name.upper() in os.environ}
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            raise DriftloopError(f"invalid {PREFIX}{str(first['loc'][0]).upper()}: {first['msg']}") from None
