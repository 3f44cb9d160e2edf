"""What the observing stage hands the acting stage: one monitor pass's verdict, typed.

A pass is stored as JSON (monitoring/store.py) for people, dashboards and the HTTP API. The loop
(loop/act.py, loop/bake.py) reads a pass only through `Verdict`, so the fields it depends on are
named, typed and checked once here instead of being fished out of nested dicts at each use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Z95 = 1.959964  # two-sided 95 % normal quantile: the width of the stored estimate's interval


def _number(value) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


@dataclass(frozen=True)
class Quality:
    """A window's quality as the monitor measured it (None where unknown)."""

    labelled: int = 0
    realized_accuracy: float | None = None
    estimated_accuracy: float | None = None
    estimated_accuracy_lower: float | None = None
    estimated_accuracy_upper: float | None = None
    estimation_error: float | None = None  # mean confidence − accuracy on the window's labelled rows
    estimated_accuracy_se: float | None = None  # the estimate's standard error as the pass computed it

    @property
    def estimated_se(self) -> float | None:
        """The label-free estimate's standard error: as the pass stored it; for a pass stored before
        it was, from the 95 % interval, which is clipped to [0, 1] and so understates it near full
        confidence (then the wider half of the interval is the better reading)."""
        if self.estimated_accuracy_se is not None:
            return self.estimated_accuracy_se
        lo, hi, est = self.estimated_accuracy_lower, self.estimated_accuracy_upper, self.estimated_accuracy
        if lo is None or hi is None:
            return None
        if est is None:
            return (hi - lo) / (2 * Z95)
        return max(hi - est, est - lo) / Z95

    @classmethod
    def from_json(cls, data: dict | None) -> "Quality":
        data = data or {}
        return cls(labelled=int(data.get("labelled") or 0),
                   **{name: _number(data.get(name)) for name in (
                       "realized_accuracy", "estimated_accuracy", "estimated_accuracy_lower",
                       "estimated_accuracy_upper", "estimation_error", "estimated_accuracy_se")})


@dataclass(frozen=True)
class Verdict:
    """One stored monitor pass of `model_version`: its drift verdict, window, quality and the
    reference it was held against. `status` is "ok" when the pass gave a verdict, "insufficient" when
    the window was too small."""

    model_version: str
    run_id: int | None = None
    status: str = "ok"
    drift: bool | None = None
    window_size: int = 0
    window_first_id: int | None = None
    window_last_id: int | None = None
    quality: Quality = field(default_factory=Quality)
    reference_accuracy: float | None = None
    reference_n: int = 0

    @property
    def has_verdict(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_json(cls, stored: dict) -> "Verdict":
        """From a stored pass (`store.latest`, `StoredPass.to_json()`, `passes.with_fresh_labels`)."""
        ref = stored.get("reference") or {}
        return cls(model_version=str(stored["model_version"]), run_id=stored.get("run_id"),
                   status=str(stored.get("status") or "insufficient"), drift=stored.get("drift"),
                   window_size=int(stored.get("window_size") or 0), window_first_id=stored.get("window_first_id"),
                   window_last_id=stored.get("window_last_id"), quality=Quality.from_json(stored.get("quality")),
                   reference_accuracy=_number(ref.get("accuracy")), reference_n=int(ref.get("accuracy_n") or 0))
