"""When to retrain: a pure decision over the loop's signals, so every branch is unit-tested.

Default mode "drift proposes, performance confirms": drift in ≥ K consecutive windows (each with
≥ M new predictions: the controller gives no verdict on re-read rows), confirmed by a drop in
accuracy that is both material (≥ `tolerance`) and significant (one-sided at `alpha`, with the
reference's interval and the window's):

- realized accuracy decides when the window holds ≥ `min_labels` labels;
- otherwise the label-free estimate (mean calibrated confidence) may confirm only once corrected by
  its own error measured on this model's labelled traffic (≥ `min_labels` labels), with that
  measurement's uncertainty in the interval, and never during the first bake after a promotion. A model is less confident on a new domain even where it is right,
  and confidence is itself a drift test: unchecked, drift would confirm itself.

Other modes: `drift` only, `performance` only, `schedule` (every N hours), `manual`
(only `driftloop retrain`). Guards apply to every automatic mode: a cooldown after a retrain, a
minimum of new labels since the last one, a cap per day; `dry_run` records what would happen.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.stats import norm

from loop.paired import mcnemar_detectable_loss, mcnemar_n

Mode = Literal["drift_and_performance", "drift", "performance", "schedule", "manual"]


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = "drift_and_performance"
    consecutive_windows: int = Field(2, ge=1, description="Drifted passes in a row before drift counts (K).")
    tolerance: float = Field(0.03, ge=0, description="Accuracy drop under the champion's reference that confirms a problem.")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="One-sided level at which the accuracy drop must be significant.")
    min_labels: int = Field(50, ge=1, description=(
        "Realized accuracy counts only from this many labels in the window; the estimate's error needs as many."))
    bake_labels: int = Field(0, ge=0, description=(
        "After a promotion, the previous champion shadow-scores this many labelled items of the new one; then one "
        "paired test decides keep or roll back. 0 (default): as many as catch a loss of bake_min_loss with "
        "bake_power at bake_discordance (268 at the defaults; 200 items would catch only a 5.8-point loss)."))
    bake_min_loss: float = Field(0.05, gt=0, lt=1, description=(
        "The smallest accuracy loss of a new champion the bake must catch (with bake_power)."))
    bake_discordance: float = Field(0.10, gt=0, le=1, description=(
        "Share of items on which the old and new champion are assumed to disagree (a refinement's measured "
        "disagreement on its gate items is of this order); the bake's power depends on it."))
    bake_power: float = Field(0.8, gt=0.5, lt=1, description="Chance the bake catches a loss of bake_min_loss.")
    bake_alpha: float = Field(0.05, gt=0, lt=0.5, description="Roll back when the paired test says the new champion is worse at this level.")
    min_new_labels: int = Field(100, ge=0, description="Feedback labels needed since the last retrain (training data for the refinement).")
    cooldown_s: float = Field(600.0, ge=0, description="Seconds after a retrain during which no other starts.")
    max_retrains_per_day: int = Field(6, ge=0)
    schedule_every_h: float = Field(24.0, gt=0, description="Mode `schedule`: retrain this often.")
    dry_run: bool = Field(False, description="Only record what the policy would do.")

    @model_validator(mode="after")
    def _bake_size(self) -> "PolicyConfig":
        """bake_labels from the loss it must catch (McNemar's power, loop/paired.py), unless set."""
        if self.bake_discordance < self.bake_min_loss:
            raise ValueError(f"policy.bake_discordance {self.bake_discordance} < policy.bake_min_loss {self.bake_min_loss}: "
                             "two models cannot differ in accuracy by more than the share of items they disagree on")
        if self.bake_labels == 0:
            self.bake_labels = mcnemar_n(self.bake_min_loss, self.bake_discordance, self.bake_alpha, self.bake_power)
        elif self.bake_labels < 10:
            raise ValueError(f"policy.bake_labels {self.bake_labels} < 10: too few items for a paired test (0: derive it)")
        return self

    def bake_detectable_loss(self) -> float | None:
        """The smallest loss the bake catches with bake_power at bake_discordance, with its bake_labels."""
        return mcnemar_detectable_loss(self.bake_labels, self.bake_discordance, self.bake_alpha, self.bake_power)


@dataclass
class Signals:
    """What the policy looks at, gathered by the controller after a monitor pass."""

    now: dt.datetime
    consecutive_drift: int
    realized_accuracy: float | None
    labelled_in_window: int
    estimated_accuracy: float | None
    reference_accuracy: float | None
    new_labels: int
    last_retrain_at: dt.datetime | None
    retrains_last_24h: int
    retrain_running: bool = False
    reference_n: int = 0  # items behind the reference accuracy (0: treated as exact)
    estimated_se: float | None = None  # the estimate's own standard error (calibrated probabilities)
    estimation_error: float | None = None  # mean confidence − accuracy on this model's labelled traffic
    estimation_error_n: int = 0
    in_first_bake: bool = False  # promoted, and the bake has not decided yet

    def to_json(self) -> dict:
        out = asdict(self)
        for key in ("now", "last_retrain_at"):
            out[key] = out[key].isoformat() if out[key] else None
        return out


@dataclass
class Decision:
    action: Literal["retrain", "skip"]
    reason: str
    dry_run: bool = False
    checks: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _binomial_var(p: float, n: int) -> float:
    return p * (1 - p) / n if n > 0 else 0.0


def _confirmed(drop: float, se: float, c: PolicyConfig) -> tuple[bool, str]:
    """Material (≥ tolerance) and significant (one-sided z at alpha): (confirmed, '± margin' note)."""
    half = norm.isf(c.alpha) * se
    return drop >= c.tolerance and drop - half > 0, f"drop {drop:+.3f}, one-sided {1 - c.alpha:.0%} margin {half:.3f}"


def _performance_drop(s: Signals, c: PolicyConfig) -> tuple[bool, str]:
    if s.reference_accuracy is None:
        return False, "no reference accuracy"
    ref, ref_var = s.reference_accuracy, _binomial_var(s.reference_accuracy, s.reference_n)
    if s.realized_accuracy is not None and s.labelled_in_window >= c.min_labels:
        se = math.sqrt(ref_var + _binomial_var(s.realized_accuracy, s.labelled_in_window))
        ok, note = _confirmed(ref - s.realized_accuracy, se, c)
        return ok, (f"realized accuracy {s.realized_accuracy:.3f} (n={s.labelled_in_window}) vs reference {ref:.3f} "
                    f"(n={s.reference_n}): {note}")
    if s.estimated_accuracy is None:
        return False, "no accuracy signal"
    est = f"estimated accuracy {s.estimated_accuracy:.3f} vs reference {ref:.3f}"
    if s.in_first_bake:
        return False, f"{est}: an estimate cannot confirm during the first bake after a promotion"
    if s.estimation_error is None or s.estimation_error_n < c.min_labels:
        return False, (f"{est}: an estimate cannot confirm until its error is measured on {c.min_labels} labels of this model's "
                       f"traffic (has {s.estimation_error_n})")
    # correct the estimate by its bias measured on this model's labelled traffic (confidence − accuracy),
    # and carry that measurement's own uncertainty (worst case p = 0.5) into the interval
    corrected = s.estimated_accuracy - s.estimation_error
    se = math.sqrt(ref_var + (s.estimated_se or 0.0) ** 2 + _binomial_var(0.5, s.estimation_error_n))
    ok, note = _confirmed(ref - corrected, se, c)
    return ok, (f"{est}, corrected by its measured error {s.estimation_error:+.3f} (n={s.estimation_error_n}) to "
                f"{corrected:.3f}: {note}")


def decide(s: Signals, c: PolicyConfig) -> Decision:
    """Retrain or skip, with the reason (stored in the audit trail either way)."""
    checks: dict = {}

    def skip(reason: str) -> Decision:
        return Decision("skip", reason, c.dry_run, checks)

    if c.mode == "manual":
        return skip("mode manual: only `driftloop retrain` starts a refinement")
    if s.retrain_running:
        return skip("a refinement is already running")
    if c.mode == "schedule":
        due = s.last_retrain_at is None or (s.now - s.last_retrain_at).total_seconds() >= c.schedule_every_h * 3600
        checks["schedule_due"] = due
        if not due:
            return skip(f"schedule: next retrain {c.schedule_every_h} h after the last")
        trigger = f"schedule: every {c.schedule_every_h} h"
    else:
        drift = s.consecutive_drift >= c.consecutive_windows
        dropped, perf_note = _performance_drop(s, c)
        checks.update({"drift": drift, "consecutive_drift": s.consecutive_drift, "performance_drop": dropped, "performance": perf_note})
        if c.mode == "drift_and_performance":
            if not drift:
                return skip(f"drift in {s.consecutive_drift} consecutive windows (< {c.consecutive_windows})")
            if not dropped:
                return skip(f"drift not confirmed by performance: {perf_note}")
            trigger = f"drift in {s.consecutive_drift} windows confirmed: {perf_note}"
        elif c.mode == "drift":
            if not drift:
                return skip(f"drift in {s.consecutive_drift} consecutive windows (< {c.consecutive_windows})")
            trigger = f"drift in {s.consecutive_drift} consecutive windows"
        else:  # performance
            if not dropped:
                return skip(f"no performance drop: {perf_note}")
            trigger = perf_note
    if s.last_retrain_at is not None:
        since = (s.now - s.last_retrain_at).total_seconds()
        checks["seconds_since_last_retrain"] = since
        if since < c.cooldown_s:
            return skip(f"cooldown: last retrain {since:.0f}s ago (< {c.cooldown_s:.0f}s); trigger was: {trigger}")
    checks["new_labels"] = s.new_labels
    if s.new_labels < c.min_new_labels:
        checks["labels_needed"] = c.min_new_labels - s.new_labels  # warranted but for labels: the loop may ask for them
        return skip(f"only {s.new_labels} new labels (< {c.min_new_labels}); trigger was: {trigger}")
    checks["retrains_last_24h"] = s.retrains_last_24h
    if s.retrains_last_24h >= c.max_retrains_per_day:
        return skip(f"cap: {s.retrains_last_24h} retrains in the last 24 h; trigger was: {trigger}")
    return Decision("retrain", trigger, c.dry_run, checks)


def confirmation_size(s: Signals, c: PolicyConfig) -> int | None:
    """How many uniformly sampled labels of the drifted traffic let `_performance_drop` decide, by
    its own interval arithmetic: with the accuracy the label-free estimate anticipates (a), the
    one-sided margin z·sqrt(var(reference) + a(1-a)/n) must fall inside the gap between the
    anticipated drop and the tolerance: below the drop when it is at least the tolerance (then the
    labels can confirm it), below tolerance − drop when it is smaller (then they can refute it).
    At least `min_labels`; None when no n can decide (the reference's own interval is wider than
    the gap): then asking would spend the budget on nothing."""
    if s.reference_accuracy is None:
        return None
    anticipated = s.estimated_accuracy if s.estimated_accuracy is not None else s.reference_accuracy
    anticipated = min(max(anticipated, 0.01), 0.99)
    drop = s.reference_accuracy - anticipated
    gap = drop if drop >= c.tolerance else c.tolerance - drop
    room = (gap / norm.isf(c.alpha)) ** 2 - _binomial_var(s.reference_accuracy, s.reference_n)
    if room <= 0:
        return None
    return max(c.min_labels, math.ceil(anticipated * (1 - anticipated) / room))
