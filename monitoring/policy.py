"""When to retrain: a pure decision over the loop's signals, so every branch is unit-tested.

Default mode "drift proposes, performance confirms": drift in ≥ K consecutive windows, confirmed by
realized accuracy (with enough labels) or estimated accuracy falling below the champion's reference
by ≥ a tolerance. Other modes: `drift` only, `performance` only, `schedule` (every N hours), `manual`
(only `driftloop retrain`). Guards apply to every automatic mode: a cooldown after a retrain, a
minimum of new labels since the last one, a cap per day; `dry_run` records what would happen.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Mode = Literal["drift_and_performance", "drift", "performance", "schedule", "manual"]


class PolicyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Mode = "drift_and_performance"
    consecutive_windows: int = Field(2, ge=1, description="Drifted passes in a row before drift counts (K).")
    tolerance: float = Field(0.03, ge=0, description="Accuracy drop under the champion's reference that confirms a problem.")
    min_labels: int = Field(50, ge=1, description="Realized accuracy counts only from this many labels in the window.")
    min_new_labels: int = Field(100, ge=0, description="Feedback labels needed since the last retrain (training data for the refinement).")
    cooldown_s: float = Field(600.0, ge=0, description="Seconds after a retrain during which no other starts.")
    max_retrains_per_day: int = Field(6, ge=0)
    schedule_every_h: float = Field(24.0, gt=0, description="Mode `schedule`: retrain this often.")
    dry_run: bool = Field(False, description="Only record what the policy would do.")


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


def _performance_drop(s: Signals, c: PolicyConfig) -> tuple[bool, str]:
    if s.reference_accuracy is None:
        return False, "no reference accuracy"
    if s.realized_accuracy is not None and s.labelled_in_window >= c.min_labels:
        drop = s.reference_accuracy - s.realized_accuracy
        return drop >= c.tolerance, f"realized accuracy {s.realized_accuracy:.3f} vs reference {s.reference_accuracy:.3f} (drop {drop:+.3f})"
    if s.estimated_accuracy is not None:
        drop = s.reference_accuracy - s.estimated_accuracy
        return drop >= c.tolerance, f"estimated accuracy {s.estimated_accuracy:.3f} vs reference {s.reference_accuracy:.3f} (drop {drop:+.3f})"
    return False, "no accuracy signal"


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
        return skip(f"only {s.new_labels} new labels (< {c.min_new_labels}); trigger was: {trigger}")
    checks["retrains_last_24h"] = s.retrains_last_24h
    if s.retrains_last_24h >= c.max_retrains_per_day:
        return skip(f"cap: {s.retrains_last_24h} retrains in the last 24 h; trigger was: {trigger}")
    return Decision("retrain", trigger, c.dry_run, checks)
