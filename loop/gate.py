"""The champion/challenger gate: promote only on a real, paired improvement that forgets nothing.

Both models are scored on the *same* items (loop/paired.py):

1. **Superiority on fresh labels** (held out from the refinement, never trained on): exact one-sided
   McNemar on the items where they disagree, at `alpha`, and a gain of at least `delta`. With ~100
   fresh labels an accuracy's standard error is ~3 points, so a raw difference would decide on noise.
2. **Non-inferiority on the cumulative regression suite** (the first champion's held-out rows plus
   every promoted generation's gate items, never trained on): Tango's score test of H0 "the
   challenger is worse by ≥ `epsilon`" must reject at `regression_alpha`. That bounds the chance of
   promoting a model that forgot more than epsilon by regression_alpha, which a point estimate
   against epsilon does not (it passes such a model about half the time at the boundary).

How large the suite must be: two equally good models that disagree on a share r of items need
n ≥ r·(z_α + z_power)²/ε² items to pass (`paired.noninferiority_n`): with ε = 0.02, α = 0.05, 80 %
power and r = 4 % (WiSE-FT challengers disagree with their champion on 2-6 % of old-domain items)
that is ~620 items; the first champion's validation split (≥ 600 rows at 3,000 training rows and
val_fraction 0.2) plus each generation's gate items reach it. A suite far below it cannot show
non-inferiority, and the gate says so rather than promote on faith.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from loop.paired import PairedComparison, mcnemar_one_sided, noninferiority_n, noninferiority_p

__all__ = ["GateConfig", "GateResult", "evaluate", "mcnemar_one_sided"]


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delta: float = Field(0.01, ge=0, description="The challenger must beat the champion on fresh labels by at least this much.")
    epsilon: float = Field(0.02, gt=0, lt=1, description=(
        "Non-inferiority margin on the regression suite: the most the challenger may have forgotten, "
        "bounded with probability 1 - regression_alpha."))
    alpha: float = Field(0.05, gt=0, lt=1, description="One-sided significance of the paired (McNemar) test on fresh labels.")
    regression_alpha: float = Field(0.05, gt=0, lt=1, description="One-sided significance of the non-inferiority test on the regression suite.")
    min_gate_items: int = Field(30, ge=1, description="Fewer held-out fresh labels: no decision (gate fails).")


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
    regression_gains: int = 0
    regression_losses: int = 0
    regression_margin: float | None = None
    regression_p_value: float | None = None

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(champion_fresh: np.ndarray, challenger_fresh: np.ndarray, champion_regression: np.ndarray,
             challenger_regression: np.ndarray, config: GateConfig) -> GateResult:
    """Each array holds 1/0 per item: was that model right. Fresh and regression arrays are paired."""
    fresh = PairedComparison.of(champion_fresh, challenger_fresh)
    reg = PairedComparison.of(champion_regression, challenger_regression)
    result = GateResult(passed=False, fresh_n=fresh.n, regression_n=reg.n, regression_margin=config.epsilon)
    if fresh.n < config.min_gate_items:
        result.reasons.append(f"only {fresh.n} held-out fresh labels (< {config.min_gate_items}): no decision")
        return result
    result.champion_fresh_accuracy = fresh.incumbent_accuracy
    result.challenger_fresh_accuracy = fresh.candidate_accuracy
    result.fresh_gain = fresh.difference
    result.challenger_only_correct, result.champion_only_correct = fresh.gains, fresh.losses
    result.p_value = mcnemar_one_sided(fresh.gains, fresh.losses)
    if result.fresh_gain < config.delta:
        result.reasons.append(f"fresh-label gain {result.fresh_gain:+.3f} < delta {config.delta:.3f}")
    if result.p_value > config.alpha:
        result.reasons.append(f"McNemar p={result.p_value:.3g} > alpha {config.alpha} "
                              f"({fresh.gains} items only the challenger got right, {fresh.losses} only the champion)")
    if reg.n == 0:
        result.reasons.append("no regression suite: non-inferiority cannot be shown")
    else:
        result.champion_regression_accuracy = reg.incumbent_accuracy
        result.challenger_regression_accuracy = reg.candidate_accuracy
        result.regression_loss = -reg.difference
        result.regression_gains, result.regression_losses = reg.gains, reg.losses
        result.regression_p_value = noninferiority_p(reg.gains, reg.losses, reg.n, config.epsilon)
        if result.regression_p_value > config.regression_alpha:
            # say whether the suite could have shown it: at the disagreement seen, how many items it takes
            disagreement = max((reg.gains + reg.losses) / reg.n, 0.01)
            needed = noninferiority_n(config.epsilon, disagreement, config.regression_alpha)
            small = (f"; at this disagreement ({disagreement:.1%}) showing it takes >= {needed} items: the suite is too small"
                     if reg.n < needed else "")
            result.reasons.append(
                f"regression suite: non-inferiority at margin {config.epsilon:.3f} not shown (p={result.regression_p_value:.3g} > "
                f"{config.regression_alpha}; loss {result.regression_loss:+.3f} on {reg.n} items, {reg.gains} gained, {reg.losses} lost{small})")
    result.passed = not result.reasons
    return result


def summary_line(e: dict) -> str:
    """One line for a gate result (`GateResult.to_json()` or its audit event): verdict, fresh-label
    accuracies, McNemar p, regression loss."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    verdict = "passed" if e.get("passed") else "failed: " + "; ".join(e.get("reasons") or [])
    p, rp = e.get("p_value"), e.get("regression_p_value")
    return (f"{verdict} (fresh {fmt(e.get('champion_fresh_accuracy'))} -> {fmt(e.get('challenger_fresh_accuracy'))} on "
            f"{e.get('fresh_n')} items, McNemar p={'-' if p is None else f'{p:.2g}'}; regression loss {fmt(e.get('regression_loss'))} "
            f"on {e.get('regression_n')} items, non-inferiority p={'-' if rp is None else f'{rp:.2g}'})")
