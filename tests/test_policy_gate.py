"""The loop's decisions, branch by branch: the retrain policy and the champion/challenger gate."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from monitoring.gate import GateConfig, evaluate, mcnemar_one_sided
from monitoring.policy import PolicyConfig, Signals, decide

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)


def signals(**kw) -> Signals:
    base = dict(now=NOW, consecutive_drift=3, realized_accuracy=0.70, labelled_in_window=100, estimated_accuracy=0.90,
                reference_accuracy=0.92, new_labels=500, last_retrain_at=None, retrains_last_24h=0)
    base.update(kw)
    return Signals(**base)


def test_drift_confirmed_by_realized_accuracy_retrains():
    d = decide(signals(), PolicyConfig())
    assert d.action == "retrain" and "realized accuracy 0.700" in d.reason


def test_no_drift_no_retrain_even_if_accuracy_dropped():
    d = decide(signals(consecutive_drift=1), PolicyConfig(consecutive_windows=2))
    assert d.action == "skip" and "consecutive" in d.reason


def test_benign_drift_is_not_confirmed_by_performance():
    d = decide(signals(realized_accuracy=0.91), PolicyConfig())
    assert d.action == "skip" and "not confirmed" in d.reason


def test_too_few_labels_falls_back_to_estimated_accuracy():
    cfg = PolicyConfig(min_labels=50)
    assert decide(signals(labelled_in_window=10, estimated_accuracy=0.91), cfg).action == "skip"
    d = decide(signals(labelled_in_window=10, estimated_accuracy=0.80), cfg)
    assert d.action == "retrain" and "estimated accuracy" in d.reason


def test_cooldown_min_new_labels_and_daily_cap_block_a_retrain():
    cfg = PolicyConfig(cooldown_s=600, min_new_labels=100, max_retrains_per_day=2)
    assert "cooldown" in decide(signals(last_retrain_at=NOW - dt.timedelta(seconds=300)), cfg).reason
    assert decide(signals(last_retrain_at=NOW - dt.timedelta(seconds=900)), cfg).action == "retrain"
    assert "new labels" in decide(signals(new_labels=99), cfg).reason
    assert "cap" in decide(signals(retrains_last_24h=2), cfg).reason


def test_dry_run_records_the_retrain_it_would_start():
    d = decide(signals(), PolicyConfig(dry_run=True))
    assert d.action == "retrain" and d.dry_run is True


def test_running_refinement_and_manual_mode_never_start_another():
    assert "already running" in decide(signals(retrain_running=True), PolicyConfig()).reason
    assert "manual" in decide(signals(), PolicyConfig(mode="manual")).reason


def test_drift_only_performance_only_and_schedule_modes():
    assert decide(signals(realized_accuracy=0.95), PolicyConfig(mode="drift")).action == "retrain"
    assert decide(signals(consecutive_drift=0), PolicyConfig(mode="performance")).action == "retrain"
    assert decide(signals(consecutive_drift=0, realized_accuracy=0.95), PolicyConfig(mode="performance")).action == "skip"
    cfg = PolicyConfig(mode="schedule", schedule_every_h=24, cooldown_s=0)
    assert decide(signals(consecutive_drift=0, last_retrain_at=NOW - dt.timedelta(hours=25)), cfg).action == "retrain"
    assert decide(signals(consecutive_drift=0, last_retrain_at=NOW - dt.timedelta(hours=2)), cfg).action == "skip"


# ---------------------------------------------------------------- gate

def test_mcnemar_exact_values():
    assert mcnemar_one_sided(0, 0) == 1.0
    assert mcnemar_one_sided(5, 0) == pytest.approx(1 / 32)
    assert mcnemar_one_sided(3, 3) == pytest.approx(42 / 64)


def _flags(n: int, correct: int) -> np.ndarray:
    return np.arange(n) < correct


def test_gate_passes_a_significant_gain_that_forgets_nothing():
    champion = _flags(100, 70)
    challenger = _flags(100, 90)  # right on every item the champion got, and 20 more
    reg = _flags(200, 180)
    r = evaluate(champion, challenger, reg, reg.copy(), GateConfig())
    assert r.passed, r.reasons
    assert r.challenger_only_correct == 20 and r.champion_only_correct == 0 and r.fresh_gain == pytest.approx(0.2)


def test_gate_refuses_a_gain_that_is_noise():
    rng = np.random.default_rng(0)
    champion = rng.random(100) < 0.8
    challenger = champion.copy()
    flip = rng.choice(100, 6, replace=False)
    challenger[flip[:4]] = True
    challenger[flip[4:]] = False  # net +2 or so: within noise
    r = evaluate(champion, challenger, _flags(50, 45), _flags(50, 45), GateConfig(delta=0.0))
    assert not r.passed and any("McNemar" in x for x in r.reasons)


def test_gate_refuses_forgetting_and_too_small_gains_and_too_few_items():
    champion, challenger = _flags(100, 60), _flags(100, 90)
    forgot = evaluate(champion, challenger, _flags(200, 190), _flags(200, 180), GateConfig(epsilon=0.01))
    assert not forgot.passed and any("regression" in x for x in forgot.reasons)
    small = evaluate(_flags(100, 80), _flags(100, 80), _flags(10, 9), _flags(10, 9), GateConfig(delta=0.01))
    assert not small.passed and any("delta" in x for x in small.reasons)
    few = evaluate(_flags(10, 2), _flags(10, 10), _flags(10, 9), _flags(10, 9), GateConfig(min_gate_items=30))
    assert not few.passed and "no decision" in few.reasons[0]
    with pytest.raises(ValueError):
        evaluate(_flags(10, 2), _flags(11, 2), _flags(1, 1), _flags(1, 1), GateConfig())
