"""The refinement's settings (`--set refine.<key>=...`), apart from the refinement itself.

The controller, its admin API and the policy read these settings; the refinement job
(loop/refine.py) imports the training stage (torch, transformers' Trainer: 3.2 s measured with
`python -c "import loop.refine"`), which a controller that only schedules refinements in child
processes never needs to load.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from core import tokens
from loop.gate import GateConfig


class RefineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    gate_fraction: float = Field(0.3, gt=0, lt=0.9, description="Share of fresh labels held out for the gate.")
    min_fresh_labels: int = Field(100, ge=2, description=(
        "Fewer fresh labels: refuse to refine. With gate_fraction it fixes the smallest gate set: "
        "min_fresh_labels x gate_fraction must reach gate.min_gate_items, or the gate could never decide."))
    max_fresh_labels: int = Field(20_000, ge=10)
    suite_part_cap: int = Field(1000, ge=10, description=(
        "Most gate items a generation adds to the regression suite as its part (a seeded uniform sample beyond): "
        "enough to test the part at the gate's margin (loop/suite.py), bounded so every later gate's cost is."))
    replay_ratio: float = Field(1.0, ge=0, description=(
        "Replayed rows per fresh training row, shared equally between all ancestor generations."))
    self_training: bool = Field(False, description="Add confident unlabelled traffic with its predicted label.")
    self_training_min_confidence: float = Field(0.97, gt=0.5, le=1.0)
    self_training_max_rows: int = Field(500, ge=0)
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(1e-4, gt=0, description="Lower than training from the base model: small steps from the champion.")
    batch_size: int = Field(32, ge=1)
    early_stopping_patience: int = Field(1, ge=0)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42
    weight_averaging: bool = Field(True, description=(
        "Average the refined weights with the champion's (WiSE-FT): keeps the gain on the new domain "
        "without forgetting the old one (docs/benchmarks.md)."))
    averaging_alphas: list[Annotated[float, Field(ge=0, le=1)]] = Field([0.5], min_length=1, description=(
        "alpha of the average (0 = the champion, 1 = the refined model); several = pick one on the refinement's "
        "validation split. Fixed 0.5 by default: that split (fresh labels + replayed training-split rows) "
        "cannot see forgetting on the old domain's unseen data, and picking on it chose 1.0 in a measured run."))
    reference_rows: int = Field(1000, ge=10, description=(
        "The challenger's reference profile: its predictions on this many of the newest texts the champion served."))
    min_reference_rows: int = Field(200, ge=10, description=(
        "Fewer logged texts than this: profile the validation split instead (and say so in the lineage). "
        "At 200 reference rows against a 1,000-row window a KS test at a Holm-corrected 0.001 detects a "
        "shift of D = 0.15; a refinement's validation split (20-120 rows) only D > 0.26."))
    promote: bool = Field(True, description="Promote when the gate passes (False: register and gate only).")
    # core.runtimes.Runtime, spelled out here: importing core.runtimes loads torch and ONNX Runtime
    serving_runtime: Literal["torch", "onnx", "onnx-int8"] | None = Field(None, description=(
        "The runtime the gate scores both models on: the one that will serve them (core/runtimes.py). None: "
        "DRIFTLOOP_SERVICE_RUNTIME if this process has it, else the runtime the prediction log says served the champion, "
        "else onnx; an int8 variant that fails its accuracy check is scored as fp32, as it serves."))
    int8_tolerance_pt: float | None = Field(None, ge=0, le=100, description=(
        "With serving_runtime onnx-int8: the int8 accuracy check's tolerance. None: DRIFTLOOP_SERVICE_INT8_TOLERANCE_PT, else 0.5."))
    gate: GateConfig = GateConfig()

    @model_validator(mode="after")
    def _can_decide(self) -> "RefineConfig":
        smallest_gate = int(self.min_fresh_labels * self.gate_fraction)
        if smallest_gate < self.gate.min_gate_items:
            raise ValueError(
                f"min_fresh_labels {self.min_fresh_labels} x gate_fraction {self.gate_fraction} = {smallest_gate} gate items "
                f"< gate.min_gate_items {self.gate.min_gate_items}: a refinement could train and never pass the gate; "
                f"raise min_fresh_labels to {math.ceil(round(self.gate.min_gate_items / self.gate_fraction, 6))}")
        if self.self_training and not tokens.predict_token_required():
            raise ValueError(
                "self_training=true trains on /predict traffic, which is anonymous unless the service requires the predict "
                f"token: set {tokens.REQUIRE_PREDICT_ENV}=true for the service and the controller, or turn self_training off")
        return self
