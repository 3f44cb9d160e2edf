"""The loop's decisions, branch by branch: the retrain policy and the champion/challenger gate."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from loop.gate import GateConfig, evaluate, mcnemar_one_sided
from loop.policy import PolicyConfig, Signals, decide

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.timezone.utc)


def signals(**kw) -> Signals:
    base = dict(now=NOW, consecutive_drift=3, realized_accuracy=0.70, labelled_in_window=100, estimated_accuracy=0.90,
                reference_accuracy=0.92, new_labels=500, last_retrain_at=None, retrains_last_24h=0, reference_n=600,
                estimated_se=0.01, estimation_error=0.0, estimation_error_n=200)
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


def test_a_drop_must_be_significant_with_both_intervals_not_just_past_the_tolerance():
    cfg = PolicyConfig(tolerance=0.03, alpha=0.05)
    # 5 points down on 60 labels against a 120-item reference: se ≈ 0.047, not significant
    noisy = decide(signals(realized_accuracy=0.85, labelled_in_window=60, reference_accuracy=0.90, reference_n=120), cfg)
    assert noisy.action == "skip" and "not confirmed" in noisy.reason
    # the same drop on 800 labels against 800 reference items is significant
    clear = decide(signals(realized_accuracy=0.85, labelled_in_window=800, reference_accuracy=0.90, reference_n=800), cfg)
    assert clear.action == "retrain"
    # significant but below the tolerance: not material
    small = decide(signals(realized_accuracy=0.88, labelled_in_window=20000, reference_accuracy=0.90, reference_n=20000), cfg)
    assert small.action == "skip"


def test_the_estimate_confirms_only_within_its_measured_error_and_never_in_the_first_bake():
    cfg = PolicyConfig(min_labels=50, tolerance=0.03)
    few = dict(labelled_in_window=10, estimated_accuracy=0.80, reference_accuracy=0.92)
    unmeasured = decide(signals(**few, estimation_error=None, estimation_error_n=0), cfg)
    assert unmeasured.action == "skip" and "until its error is measured" in unmeasured.reason
    barely = decide(signals(**few, estimation_error=0.0, estimation_error_n=20), cfg)
    assert barely.action == "skip" and "has 20" in barely.reason
    # a model 10 points under-confident on its own labelled traffic: the 12-point "drop" is mostly that
    under = decide(signals(**few, estimation_error=-0.10, estimation_error_n=300), cfg)
    assert under.action == "skip" and "measured error -0.100" in under.reason
    # over-confident by 10 points: the estimate hides a larger drop, which the correction reveals
    over = decide(signals(labelled_in_window=10, estimated_accuracy=0.92, reference_accuracy=0.92,
                          estimation_error=0.10, estimation_error_n=300), cfg)
    assert over.action == "retrain" and "to 0.820" in over.reason
    baking = decide(signals(**few, in_first_bake=True), cfg)
    assert baking.action == "skip" and "first bake" in baking.reason
    assert decide(signals(**few), cfg).action == "retrain"


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
    """A real but noise-sized gain: the challenger is right on 5 items the champion missed and wrong on
    3 it got (net +2 of 100). The point gain clears delta=0; only the paired test (one-sided exact
    McNemar, p = P(X >= 5 | 8, 1/2) = 93/256 = 0.36) refuses it."""
    champion = _flags(100, 80)  # right on items 0..79
    challenger = champion.copy()
    challenger[80:85] = True  # gained
    challenger[0:3] = False  # lost
    r = evaluate(champion, challenger, _flags(50, 45), _flags(50, 45), GateConfig(delta=0.0))
    assert (r.challenger_only_correct, r.champion_only_correct) == (5, 3) and r.fresh_gain == pytest.approx(0.02)
    assert r.p_value == pytest.approx(93 / 256)
    assert not r.passed and any("McNemar" in x for x in r.reasons)


def test_gate_refuses_forgetting_and_too_small_gains_and_too_few_items():
    champion, challenger = _flags(100, 60), _flags(100, 90)
    forgot = evaluate(champion, challenger, _flags(200, 190), _flags(200, 180), GateConfig(epsilon=0.01))
    assert not forgot.passed and any("regression" in x for x in forgot.reasons)
    assert forgot.regression_losses == 10 and forgot.regression_p_value > 0.5
    small = evaluate(_flags(100, 80), _flags(100, 80), _flags(10, 9), _flags(10, 9), GateConfig(delta=0.01))
    assert not small.passed and any("delta" in x for x in small.reasons)
    few = evaluate(_flags(10, 2), _flags(10, 10), _flags(10, 9), _flags(10, 9), GateConfig(min_gate_items=30))
    assert not few.passed and "no decision" in few.reasons[0]
    with pytest.raises(ValueError):
        evaluate(_flags(10, 2), _flags(11, 2), _flags(1, 1), _flags(1, 1), GateConfig())


def test_gate_non_inferiority_needs_a_suite_large_enough_to_decide():
    champion, challenger = _flags(100, 60), _flags(100, 90)
    # identical answers on the suite: 60 items cannot bound a 2-point loss, 600 can
    small = evaluate(champion, challenger, _flags(60, 50), _flags(60, 50), GateConfig(epsilon=0.02))
    assert not small.passed and any("non-inferiority" in x for x in small.reasons), small.reasons
    large = evaluate(champion, challenger, _flags(600, 500), _flags(600, 500), GateConfig(epsilon=0.02))
    assert large.passed, large.reasons
    # 1 point lost on 600 items (6 lost, 0 gained): within a 2-point margin, shown
    lost_one = _flags(600, 500)
    lost_one[:6] = False
    assert evaluate(champion, challenger, _flags(600, 500), lost_one, GateConfig(epsilon=0.02)).passed
    empty = evaluate(champion, challenger, _flags(0, 0), _flags(0, 0), GateConfig())
    assert not empty.passed and any("no regression suite" in x for x in empty.reasons)


def test_non_inferiority_test_holds_its_size_at_the_margin_and_has_power_inside_it():
    from loop.paired import noninferiority_n, noninferiority_p

    rng = np.random.default_rng(7)
    n, margin, alpha, rounds = 600, 0.02, 0.05, 3000
    at_margin = rng.multinomial(n, [0.02, 0.04, 0.94], size=rounds)  # challenger exactly 2 points worse
    size = np.mean([noninferiority_p(g, l_, n, margin) < alpha for g, l_, _ in at_margin])
    assert 0.03 < size < 0.07, size  # the chance of promoting a model that forgot the margin ≈ alpha
    needed = noninferiority_n(margin, 0.04, alpha, 0.8)  # equally good models that disagree on 4 % of items
    assert 550 < needed < 700
    equal = rng.multinomial(needed, [0.02, 0.02, 0.96], size=rounds)
    power = np.mean([noninferiority_p(g, l_, needed, margin) < alpha for g, l_, _ in equal])
    assert 0.74 < power < 0.9, power  # the 80 % the sample-size formula promises


def test_the_bakes_power_is_exact_and_its_size_follows_from_the_loss_it_must_catch():
    """mcnemar_power against brute-force enumeration of every (discordant, lost) outcome; the default
    bake catches a 5-point loss 80 % of the time (268 items at 10 % disagreement), where the former
    200 items caught only a 5.8-point one; the issue's example (200 items, 13 lost, 7 gained) keeps
    a model 3 points worse, which the power says is expected (31 % power at 3 points)."""
    from math import comb

    from loop.paired import mcnemar_detectable_loss, mcnemar_n, mcnemar_one_sided, mcnemar_power
    from loop.policy import PolicyConfig

    def brute(n, d, loss, alpha):
        q = (d + loss) / (2 * d)
        total = 0.0
        for disc in range(n + 1):
            p_disc = comb(n, disc) * d ** disc * (1 - d) ** (n - disc)
            for lost in range(disc + 1):
                if mcnemar_one_sided(lost, disc - lost) <= alpha:
                    total += p_disc * comb(disc, lost) * q ** lost * (1 - q) ** (disc - lost)
        return total

    for n, d, loss in ((40, 0.2, 0.1), (60, 0.1, 0.05), (80, 0.3, 0.05)):
        assert mcnemar_power(n, d, loss, 0.05) == pytest.approx(brute(n, d, loss, 0.05), abs=1e-9)
    assert mcnemar_one_sided(13, 7) == pytest.approx(0.1316, abs=1e-4)
    assert mcnemar_power(200, 0.10, 0.03, 0.05) == pytest.approx(0.307, abs=1e-3)
    policy = PolicyConfig()
    assert policy.bake_labels == mcnemar_n(0.05, 0.10) == 268 and policy.bake_detectable_loss() == 0.05
    assert all(mcnemar_power(n, 0.10, 0.05, 0.05) >= 0.8 for n in range(268, 279)) and mcnemar_power(267, 0.10, 0.05, 0.05) < 0.8
    assert mcnemar_detectable_loss(200, 0.10) == 0.058 and PolicyConfig(bake_labels=200).bake_labels == 200
    assert PolicyConfig(bake_min_loss=0.03).bake_labels > 600
    with pytest.raises(ValueError, match="bake_discordance 0.02 < policy.bake_min_loss 0.05"):
        PolicyConfig(bake_discordance=0.02)
    with pytest.raises(ValueError, match="bake_labels 5 < 10"):
        PolicyConfig(bake_labels=5)


def test_the_gate_says_when_the_suite_is_too_small_to_show_non_inferiority():
    champion, challenger = _flags(100, 60), _flags(100, 90)
    reg_champion = _flags(40, 36)
    reg_challenger = reg_champion.copy()
    reg_challenger[0] = False  # lost one, gained one: equally good, 5 % disagreement
    reg_challenger[38] = True
    r = evaluate(champion, challenger, reg_champion, reg_challenger, GateConfig())
    assert not r.passed
    (line,) = [x for x in r.reasons if x.startswith("regression suite")]
    # 0.05 · (z_0.95 + z_0.80)² / 0.02² = 0.05 · 2.4865² / 0.0004 = 772.9
    assert "the suite is too small" in line and "at this disagreement (5.0%) showing it takes >= 773 items" in line, line
