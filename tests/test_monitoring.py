"""The monitor: its statistics, and passes on real data through the real prediction log.

A real MiniLM head is fine-tuned on SST-2 train rows (its validation split is the reference); then
windows are logged exactly as the service logs them (one forward pass: probabilities, descriptors,
embeddings) and `driftloop monitor --once --json` judges them.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pytest

from monitoring import stats
from tests.conftest import cli_json, run_cli, shared_data

# ---------------------------------------------------------------- statistics

def test_wilson_interval_matches_known_values():
    lo, hi = stats.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    lo, hi = stats.wilson_interval(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
    assert all(np.isnan(stats.wilson_interval(0, 0)))


def test_holm_rejects_stepwise():
    # m=3, alpha=0.05: thresholds 0.0167, 0.025, 0.05
    assert stats.holm([0.01, 0.02, 0.04], 0.05) == [True, True, True]
    assert stats.holm([0.01, 0.03, 0.04], 0.05) == [True, False, False]
    assert stats.holm([0.02, 0.001, 0.9], 0.05) == [True, True, False]


def test_mmd_permutation_test_controls_false_alarms_and_detects_shift():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 16)).astype(np.float32)
    false_alarms = sum(stats.mmd_permutation_test(ref, rng.normal(size=(300, 16)), permutations=200, seed=s)["p_value"] <= 0.05
                       for s in range(20))
    assert false_alarms <= 3  # expected 1 of 20 at the 5 % level
    shifted = rng.normal(loc=0.3, size=(300, 16))
    assert stats.mmd_permutation_test(ref, shifted, permutations=200)["p_value"] <= 0.01


def test_vectorised_macro_f1_agrees_with_sklearn():
    from sklearn.metrics import f1_score

    from monitoring.analysis import macro_f1

    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        truth, pred = rng.integers(0, k, 200), rng.integers(0, k, 200)
        pred[:20] = 0  # unbalanced predictions
        assert macro_f1(truth, pred, k) == pytest.approx(
            f1_score(truth, pred, labels=list(range(k)), average="macro", zero_division=0))
    assert macro_f1(np.array([0, 0]), np.array([0, 0]), 2) == pytest.approx(0.5)


# ---------------------------------------------------------------- passes on real data

def _sentences(path: Path, tsv_header: bool) -> list[tuple[str, int]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        if tsv_header:
            for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
                rows.append((row["sentence"].strip(), int(row["label"])))
        else:
            for line in fh:
                text, _, label = line.rstrip("\n").rpartition("\t")
                if text.strip():
                    rows.append((text.strip(), int(label)))
    return rows


@pytest.fixture(scope="module")
def sst2_world(tmp_path_factory):
    """A real MiniLM model trained on 1,500 SST-2 train rows (30 % validation = reference), promoted."""
    home = tmp_path_factory.mktemp("monitor-home")
    train = shared_data("sst2/train.tsv")
    rows = _sentences(train, tsv_header=True)
    random.Random(7).shuffle(rows)
    train_file = home / "train.tsv"
    with open(train_file, "w", encoding="utf-8") as fh:
        fh.write("sentence\tlabel\n")
        fh.writelines(f"{t}\t{y}\n" for t, y in rows[:1500])
    out = cli_json(["train", "--data", str(train_file), "--epochs", "1", "--quiet", "--promote", "always",
                    "--set", "data.val_fraction=0.3", "--set", "report=false"], home, env={"HF_HUB_OFFLINE": "1"})
    return {"home": home, "tag": out["model"], "unseen": rows[1500:]}


def _log_traffic(home: Path, tag: str, rows: list[tuple[str, int]], feedback: bool = False) -> None:
    """Log predictions for these texts exactly as the service does, in `home` (its SQLite state DB)."""
    import os

    from tests.traffic import log_traffic

    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    log_traffic(env, tag, rows, feedback=feedback)


@pytest.mark.slow
def test_monitor_window_from_the_reference_distribution_raises_no_drift_then_yelp_does(sst2_world):
    home, tag = sst2_world["home"], sst2_world["tag"]
    # label names of a headerless 0/1 file are the strings "0", "1"
    stable = sst2_world["unseen"][:500]
    _log_traffic(home, tag, stable, feedback=True)
    out = cli_json(["monitor", "--once", "--window", "500"], home)
    assert out["status"] == "ok" and out["window_size"] == 500 and out["model_version"] == tag
    assert out["drift"] is False, [t for t in out["tests"] if t["drift"]]
    names = {t["name"] for t in out["tests"]}
    assert {"prediction", "confidence", "length_chars", "length_words", "tokens_per_word", "unknown_token_rate",
            "non_letter_share", "embedding"} <= names
    for t in out["tests"]:
        assert set(t) >= {"name", "statistic", "p_value", "threshold", "drift", "n_reference", "n_current"}
        assert 0.0 <= t["p_value"] <= 1.0 and 0.0 < t["threshold"] <= out["alpha"]
    q = out["quality"]
    assert q["labelled"] == 500
    assert q["realized_accuracy_lower"] <= q["realized_accuracy"] <= q["realized_accuracy_upper"]
    assert q["realized_accuracy"] >= 0.65  # a real model, not chance
    assert abs(q["estimation_error"]) <= 0.10  # calibrated confidence estimates accuracy
    assert Path(out["report_path"]).is_file()

    yelp = _sentences(shared_data("reviews/yelp_labelled.txt"), tsv_header=False)[:500]
    _log_traffic(home, tag, yelp)
    shifted = cli_json(["monitor", "--once", "--window", "500"], home)
    assert shifted["drift"] is True
    drifted = {t["name"] for t in shifted["tests"] if t["drift"]}
    assert drifted & {"length_chars", "length_words", "embedding"}, drifted
    assert shifted["quality"]["labelled"] == 0 and shifted["quality"]["realized_accuracy"] is None

    # the workspace holds both passes for `evidently ui`
    from evidently.ui.workspace import Workspace

    ws = Workspace(str(home / "evidently"))
    project = ws.search_project("driftloop monitor")[0]
    assert len(ws.list_runs(project.id)) == 2


def test_monitor_on_too_small_a_window_gives_no_verdict(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    demo = Path(__file__).resolve().parent.parent / "finetune" / "demo_data" / "reviews.tsv"
    out = cli_json(["train", "--data", str(demo), "--base-model", str(tiny_model_dir), "--epochs", "1", "--quiet",
                    "--promote", "always", "--set", "report=false"], home)
    rows = [(line.split("\t")[0], 0) for line in demo.read_text(encoding="utf-8").splitlines()[1:21]]
    _log_traffic(home, out["model"], rows)
    result = cli_json(["monitor", "--once", "--min-samples", "50"], home)
    assert result["status"] == "insufficient" and result["drift"] is None and result["window_size"] == 20
    assert result["tests"] == []


def test_monitor_without_anything_to_monitor_fails_with_one_line(home):
    proc = run_cli(["monitor", "--once"], home)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: nothing to monitor")


def test_monitor_rejects_bad_flags_with_one_line(home):
    for args, expected in ((["--alpha", "2"], "error: --alpha"), (["--window", "5"], "error: --window")):
        proc = run_cli(["monitor", "--once", *args], home)
        assert proc.returncode == 2
        assert expected in proc.stderr.strip().splitlines()[-1]
