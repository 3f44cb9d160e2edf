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

3. **Non-inferiority on every part of the suite** (loop/suite.py: generation 0's validation rows,
   each promoted generation's gate items), because a pooled test bounds only the average: a part
   of 9 % could lose ~22 points inside a pooled 2-point margin. Each part with at least
   `noninferiority_n(epsilon, part_discordance, regression_alpha)` items (619 at the defaults) gets
   the same Tango test, the parts' p-values corrected with Holm's step-down procedure, so that the
   claim "non-inferior on part X" holds for all parts at once with familywise error
   `regression_alpha` (for the all-parts decision alone the intersection-union principle would
   allow each at `regression_alpha`; Holm is the conservative choice, and it keeps every per-part
   claim in the audit valid). A part too small to be tested at the margin is not pooled away in
   silence: the gate's reasons and audit event give its n and the n it would need, and it still gets
   a test for harm (exact one-sided McNemar that the challenger is *worse* on it, Holm across the
   small parts): a gross loss on a small part fails the gate, a small one cannot be excluded there
   and is reported as such.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from loop.paired import PairedComparison, holm, mcnemar_one_sided, noninferiority_n, noninferiority_p

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
    part_discordance: float = Field(0.04, gt=0, lt=1, description=(
        "Planning disagreement between champion and challenger on a suite part: a part is tested for non-inferiority "
        "when it has the items this needs (noninferiority_n at epsilon, regression_alpha, 80 % power), else only for harm."))

    def part_items_needed(self) -> int:
        """Items a suite part needs to be tested for non-inferiority at the margin (fixed in advance:
        sizing parts by the disagreement seen would let a challenger that forgot a part, and so
        disagrees more on it, make that part 'too small' and escape its test)."""
        return noninferiority_n(self.epsilon, self.part_discordance, self.regression_alpha)


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
    parts: list[dict] = field(default_factory=list)  # per suite part: n, accuracies, test, Holm threshold, outcome
    notes: list[str] = field(default_factory=list)  # what the gate could not test, without failing for it

    def to_json(self) -> dict:
        return asdict(self)


def evaluate(champion_fresh: np.ndarray, challenger_fresh: np.ndarray, champion_regression: np.ndarray,
             challenger_regression: np.ndarray, config: GateConfig, parts: list[tuple[str, int]] | None = None) -> GateResult:
    """Each array holds 1/0 per item: was that model right. Fresh and regression arrays are paired.
    `parts`: the suite's parts in order, (name, items) each, covering the regression arrays."""
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
    if parts and len(parts) > 1 and reg.n:
        result.parts, part_reasons = evaluate_parts(np.asarray(champion_regression), np.asarray(challenger_regression), parts, config)
        result.reasons += part_reasons
        result.notes += [f"suite part {r['part']}: {r['n']} items < {r['needed']} needed to test non-inferiority at margin "
                         f"{config.epsilon:.3f}; tested for harm only (lost {r['losses']}, gained {r['gains']}, p={r['harm_p_value']:.3g})"
                         for r in result.parts if not r["tested"] and not r["harmed"]]
    result.passed = not result.reasons
    return result


def evaluate_parts(champion: np.ndarray, challenger: np.ndarray, parts: list[tuple[str, int]],
                   config: GateConfig) -> tuple[list[dict], list[str]]:
    """Per-part non-inferiority (Holm across the parts large enough) and harm (Holm across the rest);
    returns (one dict per part, the reasons that fail the gate)."""
    if sum(n for _, n in parts) != len(champion):
        raise ValueError(f"suite parts cover {sum(n for _, n in parts)} items, the suite has {len(champion)}")
    needed = config.part_items_needed()
    out, start = [], 0
    for name, n in parts:
        cmp = PairedComparison.of(champion[start:start + n], challenger[start:start + n])
        start += n
        row = {"part": name, "n": n, "needed": needed, "tested": n >= needed,
               "champion_accuracy": cmp.incumbent_accuracy, "challenger_accuracy": cmp.candidate_accuracy,
               "loss": -cmp.difference, "gains": cmp.gains, "losses": cmp.losses}
        if row["tested"]:
            row["p_value"] = noninferiority_p(cmp.gains, cmp.losses, n, config.epsilon)
        else:
            row["harm_p_value"] = mcnemar_one_sided(cmp.losses, cmp.gains)
        out.append(row)
    reasons = []
    tested = [r for r in out if r["tested"]]
    for r, (threshold, rejected) in zip(tested, holm([r["p_value"] for r in tested], config.regression_alpha)):
        r["holm_threshold"], r["shown"] = threshold, rejected
        if not rejected:
            reasons.append(f"suite part {r['part']}: non-inferiority at margin {config.epsilon:.3f} not shown (p={r['p_value']:.3g} > "
                           f"Holm threshold {threshold:.3g}; loss {r['loss']:+.3f} on {r['n']} items, {r['gains']} gained, {r['losses']} lost)")
    small = [r for r in out if not r["tested"]]
    for r, (threshold, rejected) in zip(small, holm([r["harm_p_value"] for r in small], config.regression_alpha)):
        r["holm_threshold"], r["harmed"] = threshold, rejected
        if rejected:
            reasons.append(f"suite part {r['part']}: the challenger is worse (lost {r['losses']}, gained {r['gains']} of {r['n']} items, "
                           f"McNemar p={r['harm_p_value']:.3g} <= Holm threshold {threshold:.3g}); too small ({r['n']} < {r['needed']} "
                           "items) for non-inferiority at the margin")
    return out, reasons


def parts_line(parts: list[dict]) -> str:
    """One line per gate: each part's accuracies and outcome, the untested ones with the n they would need."""
    def one(r: dict) -> str:
        acc = f"{r['champion_accuracy']:.3f}->{r['challenger_accuracy']:.3f} on {r['n']}"
        if r["tested"]:
            return f"{r['part']} {acc}: {'non-inferior' if r.get('shown') else 'NOT shown non-inferior'} (p={r['p_value']:.2g})"
        verdict = "WORSE" if r.get("harmed") else "no harm found"
        return f"{r['part']} {acc}: too small to test the margin (needs {r['needed']}), {verdict} (harm p={r['harm_p_value']:.2g})"
    return "; ".join(one(r) for r in parts)


def summary_line(e: dict) -> str:
    """One line for a gate result (`GateResult.to_json()` or its audit event): verdict, fresh-label
    accuracies, McNemar p, regression loss."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    verdict = "passed" if e.get("passed") else "failed: " + "; ".join(e.get("reasons") or [])
    p, rp = e.get("p_value"), e.get("regression_p_value")
    parts = f"; parts: {parts_line(e['parts'])}" if e.get("parts") else ""
    return (f"{verdict} (fresh {fmt(e.get('champion_fresh_accuracy'))} -> {fmt(e.get('challenger_fresh_accuracy'))} on "
            f"{e.get('fresh_n')} items, McNemar p={'-' if p is None else f'{p:.2g}'}; regression loss {fmt(e.get('regression_loss'))} "
            f"on {e.get('regression_n')} items, non-inferiority p={'-' if rp is None else f'{rp:.2g}'}{parts})")
