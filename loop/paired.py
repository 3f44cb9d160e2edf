"""Paired tests for every comparison that moves production (gate, bake, rollback).

Both models are scored on the *same* items, so only the items where they disagree carry
information: `gains` = items only the challenger (or new champion) got right, `losses` = items only
the incumbent got right, out of `n` items.

- `mcnemar_one_sided`: exact test that the challenger is *better* (superiority on fresh labels).
- `noninferiority_p`: Tango's (1998) score test that the challenger is *not worse by more than a
  margin* (H0: p_challenger − p_champion ≤ −margin). A point estimate against the margin ("lost at
  most ε") is wrong about half the time when the true loss sits at ε; this bounds the chance of
  promoting a model that forgot more than the margin by alpha. Tango's score test keeps its size
  close to alpha with few discordant pairs, where the Wald test does not (it is undefined at 0).
- `noninferiority_n`: how many items such a test needs, to state "n is large enough to decide".
- `mcnemar_power`, `mcnemar_n`, `mcnemar_detectable_loss`: the same for the bake's McNemar test.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from math import comb

import numpy as np
from scipy.stats import binom, norm


def mcnemar_one_sided(gains: int, losses: int) -> float:
    """Exact one-sided McNemar p-value that the challenger is better: P(X ≥ gains | gains+losses, 1/2)."""
    k = gains + losses
    if k == 0:
        return 1.0
    return float(sum(comb(k, i) for i in range(gains, k + 1)) / 2**k)


def holm(p_values: list[float], alpha: float) -> list[tuple[float, bool]]:
    """Holm's step-down procedure (1979): for each p-value, in the order given, (its threshold, whether
    its null hypothesis is rejected) with familywise error ≤ alpha. The j-th smallest p is compared
    with alpha / (m − j + 1); from the first that fails on, none is rejected."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    out: list[tuple[float, bool]] = [(0.0, False)] * len(p_values)
    still = True
    for rank, i in enumerate(order):
        threshold = alpha / (len(p_values) - rank)
        still = still and p_values[i] <= threshold
        out[i] = (threshold, still)
    return out


def _restricted_mle_losses(gains: int, losses: int, n: int, delta0: float) -> float:
    """MLE of P(loss) under H0's boundary p_gain − p_loss = delta0 (a quadratic's admissible root)."""
    a = 2.0 * n
    b = -(gains * (1 - delta0) + losses * (1 - 3 * delta0) - 2 * (n - gains - losses) * delta0)
    c = -losses * delta0 * (1 - delta0)
    disc = max(b * b - 4 * a * c, 0.0)
    lo = max(0.0, -delta0)  # p_gain = p_loss + delta0 must be ≥ 0
    hi = (1.0 - delta0) / 2.0  # p_gain + p_loss ≤ 1
    for root in ((-b + math.sqrt(disc)) / (2 * a), (-b - math.sqrt(disc)) / (2 * a)):
        if lo - 1e-12 <= root <= hi + 1e-12:
            return min(max(root, lo), hi)
    return min(max((-b + math.sqrt(disc)) / (2 * a), lo), hi)


def noninferiority_p(gains: int, losses: int, n: int, margin: float) -> float:
    """One-sided p-value of H0 "challenger worse by ≥ margin" (Tango's score test); small = non-inferior."""
    if n <= 0:
        return 1.0
    delta0 = -abs(margin)
    q_loss = _restricted_mle_losses(gains, losses, n, delta0)
    q_gain = q_loss + delta0
    var = (q_gain + q_loss - delta0 * delta0) / n
    diff = (gains - losses) / n
    if var <= 0:
        return 0.0 if diff > delta0 else 1.0
    return float(norm.sf((diff - delta0) / math.sqrt(var)))


def noninferiority_n(margin: float, discordance: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items needed to show non-inferiority of two *equally good* models that disagree on a share
    `discordance` of items: n ≥ discordance · (z_{1−α} + z_{power})² / margin²."""
    z = norm.isf(alpha) + norm.isf(1 - power)
    return int(math.ceil(discordance * z * z / (margin * margin)))


def _mcnemar_critical(discordant: np.ndarray, alpha: float) -> np.ndarray:
    """For each count of discordant items D, the fewest losses L with exact one-sided p = P(X ≥ L | D, 1/2) ≤ alpha."""
    crit = binom.ppf(1 - alpha, discordant, 0.5).astype(int) + 1  # P(X ≥ crit) ≤ alpha, the smallest such
    return np.where(binom.sf(crit - 2, discordant, 0.5) <= alpha, crit - 1, crit)


def mcnemar_power(n: int, discordance: float, loss: float, alpha: float) -> float:
    """Power of the exact one-sided McNemar test on `n` paired items to find the new model worse,
    when the two models disagree on a share `discordance` of items and the new one is `loss` less
    accurate: among disagreements, a share (discordance + loss) / (2 · discordance) are its losses.
    Exact: summed over the binomial count of disagreements."""
    if not 0 < loss <= discordance <= 1:
        raise ValueError(f"need 0 < loss ({loss}) <= discordance ({discordance}) <= 1")
    q = (discordance + loss) / (2 * discordance)
    counts = np.arange(n + 1)
    weights = binom.pmf(counts, n, discordance)
    keep = weights > 1e-12
    counts, weights = counts[keep], weights[keep]
    return float(np.sum(weights * binom.sf(_mcnemar_critical(counts, alpha) - 1, counts, q)))


def mcnemar_n(loss: float, discordance: float, alpha: float = 0.05, power: float = 0.8, n_max: int = 20_000) -> int:
    """The fewest paired items at which `mcnemar_power` reaches `power` (and stays there for the
    next 10: the exact test's power saw-tooths with n)."""
    for n in range(10, n_max):
        if all(mcnemar_power(m, discordance, loss, alpha) >= power for m in range(n, n + 11)):
            return n
    raise ValueError(f"no n <= {n_max} detects a loss of {loss} at discordance {discordance}")


def mcnemar_detectable_loss(n: int, discordance: float, alpha: float = 0.05, power: float = 0.8) -> float | None:
    """The smallest loss (to 0.1 point) that `n` paired items catch with the given power (None: not
    even a loss as large as the disagreement itself)."""
    for tenths in range(1, int(round(discordance * 1000)) + 1):
        if mcnemar_power(n, discordance, tenths / 1000, alpha) >= power:
            return tenths / 1000
    return None


@dataclass
class PairedComparison:
    """A paired comparison of two models on the same n items, as stored in the audit trail."""

    n: int
    incumbent_accuracy: float | None
    candidate_accuracy: float | None
    gains: int  # items only the candidate got right
    losses: int  # items only the incumbent got right

    @classmethod
    def of(cls, incumbent_correct, candidate_correct) -> "PairedComparison":
        a, b = np.asarray(incumbent_correct, bool), np.asarray(candidate_correct, bool)
        if a.shape != b.shape:
            raise ValueError("paired arrays must have the same items for both models")
        n = int(a.size)
        return cls(n, float(a.mean()) if n else None, float(b.mean()) if n else None, int((b & ~a).sum()), int((a & ~b).sum()))

    @property
    def difference(self) -> float | None:
        return None if not self.n else (self.gains - self.losses) / self.n

    def to_json(self) -> dict:
        return {**asdict(self), "difference": self.difference}
