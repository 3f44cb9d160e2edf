"""The champion/challenger gate: promote only on a real, paired improvement that forgets nothing.

With ~100 fresh labels an accuracy's standard error is ~3 points, so a raw difference decides on
noise. Both models are scored on the *same* held-out items and compared with an exact McNemar test
on the items where they disagree; on a frozen regression set (the champion's validation data) the
challenger may lose at most `epsilon`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from math import comb

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delta: float = Field(0.01, ge=0, description="The challenger must beat the champion on fresh labels by at least this much.")
    epsilon: float = Field(0.01, ge=0, description="It may lose at most this much on the frozen regression set.")
    alpha: float = Field(0.05, gt=0, lt=1, description="One-sided significance of the paired (McNemar) test on fresh labels.")
    min_gate_items: int = Field(30, ge=1, description="Fewer held-out fresh labels: no decision (gate fails).")


def mcnemar_one_sided(challenger_only: int, champion_only: int) -> float:
    """Exact one-sided McNemar p-value that the challenger is better: P(X ≥ b | b+c, 1/2)."""
    n = challenger_only + champion_only
    if n == 0:
        return 1.0
    return float(sum(comb(n, k) for k in range(challenger_only, n + 1)) / 2**n)


@dataclass
class GateResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    fresh_n: int = 0
    champion_fresh_accuracy: float | None = None
    challenger_fresh_accuracy: float | None = None
    fresh_gain: float | None = None
    challenger_only_correct: int = 0
    champion_only_correct: int = 0
    p_value: float | None = None
    regression_n: int = 0
    champion_regression_accuracy: float | None = None
    challenger_regression_accuracy: float | None = None
    regression_loss: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(champion_fresh: np.ndarray, challenger_fresh: np.ndarray, champion_regression: np.ndarray,
             challenger_regression: np.ndarray, config: GateConfig) -> GateResult:
    """Each array holds 1/0 per item: was that model right. Fresh and regression arrays are paired."""
    a, b = np.asarray(champion_fresh, bool), np.asarray(challenger_fresh, bool)
    ra, rb = np.asarray(champion_regression, bool), np.asarray(challenger_regression, bool)
    if a.shape != b.shape or ra.shape != rb.shape:
        raise ValueError("gate arrays must be paired (same items for both models)")
    result = GateResult(passed=False, fresh_n=int(a.size), regression_n=int(ra.size))
    if a.size < config.min_gate_items:
        result.reasons.append(f"only {a.size} held-out fresh labels (< {config.min_gate_items}): no decision")
        return result
    result.champion_fresh_accuracy = float(a.mean())
    result.challenger_fresh_accuracy = float(b.mean())
    result.fresh_gain = result.challenger_fresh_accuracy - result.champion_fresh_accuracy
    result.challenger_only_correct = int((b & ~a).sum())
    result.champion_only_correct = int((a & ~b).sum())
    result.p_value = mcnemar_one_sided(result.challenger_only_correct, result.champion_only_correct)
    if ra.size:
        result.champion_regression_accuracy = float(ra.mean())
        result.challenger_regression_accuracy = float(rb.mean())
        result.regression_loss = result.champion_regression_accuracy - result.challenger_regression_accuracy
    if result.fresh_gain < config.delta:
        result.reasons.append(f"fresh-label gain {result.fresh_gain:+.3f} < delta {config.delta:.3f}")
    if result.p_value > config.alpha:
        result.reasons.append(f"McNemar p={result.p_value:.3g} > alpha {config.alpha} "
                              f"({result.challenger_only_correct} items only the challenger got right, {result.champion_only_correct} only the champion)")
    if result.regression_loss is not None and result.regression_loss > config.epsilon:
        result.reasons.append(f"regression-set loss {result.regression_loss:.3f} > epsilon {config.epsilon:.3f}")
    result.passed = not result.reasons
    return result
