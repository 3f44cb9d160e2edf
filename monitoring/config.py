"""Monitor settings, typed, with defaults that held up on real data (bench/drift.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class MonitorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    window: int = Field(1000, ge=10, description="A pass looks at the last N predictions of the serving model version.")
    window_seconds: float | None = Field(None, gt=0, description="If set, only predictions from the last S seconds (still at most `window`).")
    min_samples: int = Field(200, ge=10, description="Fewer predictions in the window: no verdict (status 'insufficient').")
    min_new_predictions: int = Field(200, ge=1, description=(
        "A scheduled pass runs only once this many predictions arrived since the last pass with a verdict (M): "
        "K drifted windows in a row then rest on at least K x M distinct predictions, never on re-read rows."))
    alpha: float = Field(0.01, gt=0, lt=0.5, description=(
        "Family-wise false-alarm rate of one pass: Holm-Bonferroni over all drift tests of the window."))
    embedding_test: bool = Field(True, description="Test pooled embeddings (MMD² permutation test).")
    embedding_permutations: int = Field(2000, ge=100, description="Permutations of the embedding test (p-value floor 1/(P+1)).")
    embedding_max_samples: int = Field(400, ge=50, description="Rows per side the embedding test subsamples to (speed).")
    min_labels: int = Field(30, ge=1, description="Fewer feedback labels in the window: no realized quality.")
    bootstrap_rounds: int = Field(300, ge=50, description="Bootstrap resamples for the macro-F1 interval.")
    report: bool = Field(True, description="Write Evidently's HTML report and a snapshot into the Evidently workspace.")
