"""Statistics the monitor needs and Evidently 0.7 does not provide in a usable form.

- `mmd_permutation_test`: embedding drift. Evidently's `EmbeddingsDrift` returns a score only, spends
  7-10 s per 1,000 rows drawing a t-SNE plot, and its default rule (domain-classifier ROC AUC > 0.55)
  false-alarms on small windows; its bootstrap resamples the reference only (eth-easl/modyn#414).
  A permutation test over the pooled samples gives a p-value with the stated false-alarm rate by
  construction (measured: bench/drift.py, docs/benchmarks.md).
- `wilson_interval`: a 95 % interval for an accuracy that behaves at small n and near 0 or 1.
- `bootstrap_interval`: the same for macro-F1, which has no closed form.
- `holm`: the family-wise multiple-testing correction behind the window's drift verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (nan, nan) when n == 0."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Callable[[np.ndarray], float], n: int, *, rounds: int = 500, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `values(index_sample)` over `rounds` resamples of range(n)."""
    if n <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    stats = np.array([values(rng.integers(0, n, n)) for _ in range(rounds)])
    lo, hi = np.nanpercentile(stats, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def _sq_dists(x: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", x, x)
    d = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.maximum(d, 0.0, out=d)
    return d


def mmd_permutation_test(reference: np.ndarray, current: np.ndarray, *, permutations: int = 200,
                         max_samples: int = 500, seed: int = 0) -> dict:
    """Two-sample test on embeddings: RBF-kernel MMD² (V-statistic) with a permutation p-value.

    Each side is subsampled to at most `max_samples` rows (fixed seed: the same window gives the same
    answer) so a pass stays fast at any window size; the kernel bandwidth is the median pairwise
    distance of the pooled sample. Returns the statistic (MMD²), the p-value and the sizes used.
    """
    rng = np.random.default_rng(seed)
    ref = reference[rng.permutation(len(reference))[:max_samples]].astype(np.float64)
    cur = current[rng.permutation(len(current))[:max_samples]].astype(np.float64)
    pooled = np.concatenate([ref, cur])
    d = _sq_dists(pooled)
    off_diag = d[np.triu_indices(len(pooled), k=1)]
    bandwidth = float(np.median(off_diag)) or 1.0
    k = np.exp(-d / bandwidth)
    n, m = len(ref), len(cur)
    # MMD² (V-statistic) of a split is wᵀKw with w = +1/n on one side and -1/m on the other, so all
    # permutations are one matrix product.
    signs = np.zeros((n + m, permutations + 1))
    signs[:n, 0] = 1.0
    for j in range(1, permutations + 1):
        signs[rng.permutation(n + m)[:n], j] = 1.0
    weights = np.where(signs > 0, 1.0 / n, -1.0 / m)
    stats = np.einsum("ij,ij->j", weights, k @ weights)
    observed = float(stats[0])
    exceed = int((stats[1:] >= observed).sum())
    return {"statistic": observed, "p_value": (exceed + 1) / (permutations + 1), "n_reference": n, "n_current": m,
            "bandwidth": bandwidth}


def holm(p_values: Sequence[float], alpha: float) -> list[bool]:
    """Holm-Bonferroni: which hypotheses are rejected at family-wise error rate `alpha`."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    m = len(p_values)
    for rank, i in enumerate(order):
        if p_values[i] <= alpha / (m - rank):
            rejected[i] = True
        else:
            break
    return rejected
