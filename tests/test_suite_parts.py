"""Per-part non-inferiority (loop/gate.py, loop/suite.py): a domain forgotten inside a pooled margin
is caught; parts too small for the margin are named, with the n they would need."""

from __future__ import annotations

import numpy as np
import pytest


def _pairs(n: int, gains: int, losses: int, both_wrong: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(champion, challenger) correctness flags on n items: `gains` only the challenger got right,
    `losses` only the champion, `both_wrong` neither, the rest both."""
    champion = np.ones(n, dtype=int)
    challenger = np.ones(n, dtype=int)
    champion[:gains] = 0
    challenger[gains:gains + losses] = 0
    champion[gains + losses:gains + losses + both_wrong] = 0
    challenger[gains + losses:gains + losses + both_wrong] = 0
    return champion, challenger


def _suite(*blocks):
    return tuple(np.concatenate(x) for x in zip(*blocks))


def test_holm_step_down():
    from loop.paired import holm

    out = holm([0.01, 0.04, 0.03], 0.05)
    assert [r for _, r in out] == [True, False, False]  # 0.01 <= 0.05/3; 0.03 > 0.05/2 stops the rest
    assert out[0][0] == pytest.approx(0.05 / 3) and out[2][0] == pytest.approx(0.05 / 2) and out[1][0] == pytest.approx(0.05)
    assert [r for _, r in holm([0.001, 0.02], 0.05)] == [True, True]
    assert holm([], 0.05) == []


def test_a_domain_forgotten_inside_the_pooled_margin_fails_the_gate():
    """9 % of the suite loses 22 points: the pooled test passes, the part's harm test does not."""
    from loop.gate import GateConfig, evaluate

    fresh = _pairs(100, 12, 2)
    old_c, old_x = _pairs(2000, 30, 10)
    new_c, new_x = _pairs(200, 0, 44)
    champion, challenger = _suite((old_c, old_x), (new_c, new_x))
    pooled = evaluate(*fresh, champion, challenger, GateConfig())
    assert pooled.passed, pooled.reasons  # what the pooled gate alone did
    result = evaluate(*fresh, champion, challenger, GateConfig(), parts=[("g0", 2000), ("g1", 200)])
    assert not result.passed
    (reason,) = result.reasons
    assert "suite part g1" in reason and "worse" in reason and "200 < 619" in reason
    g0, g1 = result.parts
    assert g0["tested"] and g0["shown"] and not g1["tested"] and g1["harmed"] and g1["loss"] == pytest.approx(0.22)


def test_every_large_part_must_show_non_inferiority_with_holm():
    from loop.gate import GateConfig, evaluate

    fresh = _pairs(100, 12, 2)
    good_c, good_x = _pairs(1000, 20, 15)
    edge_c, edge_x = _pairs(1000, 10, 28)  # 1.8 points lost on its own: cannot be shown within 2 points
    champion, challenger = _suite((good_c, good_x), (edge_c, edge_x))
    result = evaluate(*fresh, champion, challenger, GateConfig(), parts=[("g0", 1000), ("g1", 1000)])
    assert not result.passed and any(r.startswith("suite part g1: non-inferiority") for r in result.reasons)
    assert [p["shown"] for p in result.parts] == [True, False]
    assert result.parts[0]["holm_threshold"] == pytest.approx(0.025)  # the smaller p meets alpha / 2


def test_a_small_part_without_harm_is_named_not_silently_pooled():
    from loop.gate import GateConfig, evaluate, summary_line

    fresh = _pairs(100, 12, 2)
    big_c, big_x = _pairs(1500, 15, 10)
    small_c, small_x = _pairs(60, 2, 3)
    champion, challenger = _suite((big_c, big_x), (small_c, small_x))
    result = evaluate(*fresh, champion, challenger, GateConfig(), parts=[("g0", 1500), ("g1", 60)])
    assert result.passed, result.reasons
    (note,) = result.notes
    assert "suite part g1: 60 items < 619 needed" in note
    assert "too small to test the margin (needs 619)" in summary_line(result.to_json())
    with pytest.raises(ValueError, match="cover"):
        evaluate(*fresh, champion, challenger, GateConfig(), parts=[("g0", 1500)] + [("g1", 59)])


def test_part_items_needed_is_fixed_in_advance():
    from loop.gate import GateConfig
    from loop.paired import noninferiority_n

    assert GateConfig().part_items_needed() == noninferiority_n(0.02, 0.04, 0.05) == 619
    assert GateConfig(epsilon=0.04).part_items_needed() < 619


def test_suite_parts_extend_cap_and_recount():
    from loop import suite

    rows = [(f"a{i}", "pos") for i in range(5)] + [(f"b{i}", "neg" if i % 2 else "other") for i in range(4)]
    parts = [suite.Part("g0", 0, "first", 5), suite.Part("g1", 1, "shift", 4)]
    kept, kept_parts = suite.keep_labels(rows, parts, ["pos", "neg"])
    assert [p.n for p in kept_parts] == [5, 2] and len(kept) == 7
    new = [(f"c{i}", "pos") for i in range(50)]
    grown, grown_parts = suite.extend(kept, kept_parts, new, 2, "shift 2", part_cap=20, seed=1)
    assert grown_parts[-1] == suite.Part("g2", 2, "shift 2", 20) and grown[:7] == kept
    picked = grown[7:]
    assert len(set(picked)) == 20 and set(picked) <= set(new) and picked == sorted(picked, key=new.index)
    again, _ = suite.extend(kept, kept_parts, new, 2, "shift 2", part_cap=20, seed=1)
    assert again == grown, "seeded: the same part on a re-run"
    blocks = suite.split(grown, grown_parts)
    assert [len(b) for _, b in blocks] == [5, 2, 20]


def test_suite_parts_of_older_lineages():
    from loop import suite

    assert suite.parts_of({"data_lineage": {"generation": 2, "regression_suite_parts": {"inherited": 700, "gate_items": 40}}}, 740) == [
        suite.Part("inherited", 0, "suite stored before parts were recorded", 700), suite.Part("g2", 2, "gate items", 40)]
    assert [p.n for p in suite.parts_of({}, 300)] == [300]
    stored = [{"name": "g0", "generation": 0, "domain": "d", "n": 10}, {"name": "g1", "generation": 1, "domain": "e", "n": 5}]
    assert [p.name for p in suite.parts_of({"data_lineage": {"generation": 1, "regression_suite_parts": stored}}, 15)] == ["g0", "g1"]


def test_a_promotion_into_a_harder_domain_then_benign_drift_retrains_nothing():
    """The reference accuracy the monitor reports for a refined model comes from its gate items (the
    traffic its profile comes from), not the suite (mostly earlier, easier domains): a benign drift
    in the harder domain, at the domain's own level of accuracy, confirms nothing."""
    import dataclasses
    import datetime as dt
    import types

    from core import runtimes
    from loop.policy import PolicyConfig, Signals, decide

    reference = {"accuracy": 0.80, "n": 300, "source": "gate items (labelled rows of the traffic the profile comes from)",
                 "suite_accuracy": 0.93, "suite_n": 1200}
    model = types.SimpleNamespace(lineage={"reference": reference})
    assert runtimes._runtime_accuracy(model, "onnx", {}) == (0.80, 300)
    manifest = {"files": {"onnx-int8": {"sha256": "x"}},
                "int8_check": {"int8_sha256": "x", "accuracy_fp32": 0.93, "accuracy_int8": 0.925, "n": 1200}}
    acc, n = runtimes._runtime_accuracy(model, "onnx-int8", manifest)  # int8's paired loss on the suite, applied to the gate figure
    assert acc == pytest.approx(0.795) and n == 300

    signals = Signals(now=dt.datetime(2026, 12, 4, tzinfo=dt.timezone.utc), consecutive_drift=5, realized_accuracy=0.79,
                      labelled_in_window=200, estimated_accuracy=0.80, reference_accuracy=0.80, reference_n=300, new_labels=400,
                      last_retrain_at=None, retrains_last_24h=0, estimated_se=0.01, estimation_error=0.0, estimation_error_n=200)
    assert decide(signals, PolicyConfig()).action == "skip"
    # the suite's figure, which the reference used to be, "confirms" the same benign drift
    assert decide(dataclasses.replace(signals, reference_accuracy=0.93, reference_n=1200), PolicyConfig()).action == "retrain"
