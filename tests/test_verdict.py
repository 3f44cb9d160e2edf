"""The estimate's standard error the policy reads is the one the pass computed, not one read back
from an interval clipped at 1 (which understated it near full confidence)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest


def test_the_estimates_standard_error_is_not_read_from_a_clipped_interval():
    from types import SimpleNamespace

    from monitoring.analysis import quality
    from monitoring.config import MonitorConfig
    from monitoring.verdict import Z95, Quality

    conf = np.full(100, 1.0)
    conf[0] = 0.5  # mean 0.995, se 0.005: the upper bound 0.995 + 1.96 se is clipped at 1
    frame = pd.DataFrame({"confidence": conf, "label": [None] * 100, "prediction": ["a"] * 100, "label_source": [None] * 100})
    q = quality(SimpleNamespace(label_names=["a", "b"]), SimpleNamespace(frame=frame), MonitorConfig())
    se = math.sqrt(float(np.sum(conf * (1 - conf)))) / 100
    assert q["estimated_accuracy_upper"] == 1.0 and q["estimated_accuracy_se"] == pytest.approx(se)
    stored = Quality.from_json(q)
    assert stored.estimated_se == pytest.approx(se)
    clipped_reading = (q["estimated_accuracy_upper"] - q["estimated_accuracy_lower"]) / (2 * Z95)
    assert clipped_reading < 0.9 * se  # what the old reading gave: an error too small by more than 10 %
    # a pass stored before the field existed: the wider (unclipped) half of its interval
    old = Quality.from_json({k: v for k, v in q.items() if k != "estimated_accuracy_se"})
    assert old.estimated_se == pytest.approx(se, rel=1e-3)
