"""Label requests: the budget, the two kinds of selection, answers through the /feedback path, and
the loop asking after a pass (labels/, loop/ask.py)."""

from __future__ import annotations

import datetime as dt
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest

LABELS = ["negative", "positive"]
UTC = dt.timezone.utc


def _rows(n: int, start: int, rng: np.random.Generator, positive_share: float = 0.5):
    from core.descriptors import DESCRIPTOR_COLUMNS
    from core.predlog import LoggedPrediction

    out = []
    for i in range(n):
        p = float(rng.uniform(0.5, 1.0))
        label = "positive" if rng.random() < positive_share else "negative"
        probs = {label: p, ("negative" if label == "positive" else "positive"): 1 - p}
        out.append(LoggedPrediction(request_id=f"{start + i:032x}", text=f"text {start + i}", label=label, confidence=p,
                                    probs=probs, descriptors=dict.fromkeys(DESCRIPTOR_COLUMNS, 1.0), truncated=False,
                                    embedding=rng.normal(size=8).astype(np.float32) + (4.0 if i % 2 else -4.0)))
    return out


@pytest.fixture()
def log(db_url):
    """600 unlabelled predictions of m:1 (two clusters of embeddings)."""
    from core import predlog
    from core.statedb import get_engine
    from labels import requests

    engine = get_engine(db_url)
    predlog.ensure_schema(engine)
    requests.ensure_schema(engine)
    rng = np.random.default_rng(0)
    for b in range(6):
        predlog.write_batch(engine, "m:1", _rows(100, b * 100, rng))
    return engine


def test_the_budget_is_never_exceeded(log):
    from labels import requests
    from labels.config import LabelsConfig

    config = LabelsConfig(per_day=120, per_refinement=50, confirm_max=60)
    rng = random.Random(0)
    ids = list(range(1, 601))
    rng.shuffle(ids)
    now = dt.datetime.now(UTC)
    for step in range(30):  # many callers, mixed purposes, over 12 hours
        chunk = [requests.Candidate(i, f"{i - 1:032x}") for i in ids[step * 20:(step + 1) * 20]]
        purpose = rng.choice(["confirmation", "training"])
        requests.create(log, chunk, model_version="m:1", kind="random", purpose=purpose, reason="test", config=config,
                        now=now + dt.timedelta(minutes=24 * step))
        with log.connect() as conn:
            assert requests.used_today(conn, now + dt.timedelta(minutes=24 * step)) <= 120
            assert requests.used_for_training(conn, None) <= 50
    summary = requests.summary(log, config, now=now + dt.timedelta(minutes=24 * 29))
    assert summary["asked"] == 120 and summary["pending"] == 120 and summary["budget_left_today"] == 0
    # a day later the budget is back; a prediction is never asked about twice
    later = now + dt.timedelta(hours=36)
    again = requests.create(log, [requests.Candidate(i, f"{i - 1:032x}") for i in ids[:200]], model_version="m:1", kind="random",
                            purpose="confirmation", reason="test", config=config, now=later)
    assert again.already_asked > 0 and again.created == min(120, 200 - again.already_asked)
    assert again.already_asked + again.created + again.refused_by_budget == 200
    with log.connect() as conn:
        assert requests.used_today(conn, later) == again.created <= 120


def test_impossible_settings_are_refused_in_one_line():
    from labels.config import LabelsConfig
    from loop.controller import ControllerSettings

    with pytest.raises(ValueError, match="per_refinement 500 > labels.per_day 300"):
        LabelsConfig(per_refinement=500)
    with pytest.raises(ValueError, match="confirm_max 400 > labels.per_day 300"):
        LabelsConfig(confirm_max=400)
    with pytest.raises(ValueError, match="labels.confirm_max 20 < policy.min_labels 50"):
        ControllerSettings.model_validate({"labels": {"confirm_max": 20}})
    with pytest.raises(ValueError, match="labels.per_refinement 50 < refine.min_fresh_labels"):
        ControllerSettings.model_validate({"labels": {"per_refinement": 50}})
    ControllerSettings.model_validate({"labels": {"per_refinement": 50, "enabled": False}})  # off: nothing to check


def test_a_confirmation_sample_is_uniform_over_the_window_and_unlabelled(log):
    from core import predlog
    from labels import select

    predlog.record_feedback(log, [(f"{i:032x}", "positive") for i in range(200, 260)], lambda v: LABELS)
    picked = select.random_sample(log, "m:1", 101, 400, 100, seed=1)
    ids = [c.log_id for c in picked]
    assert len(ids) == 100 == len(set(ids)) and all(101 <= i <= 400 for i in ids)
    assert not set(ids) & set(range(201, 261)), "labelled rows are not asked about again"
    assert 35 < sum(1 for i in ids if i <= 250) < 65  # both halves of the window (uniform: 47 expected)
    assert [c.log_id for c in select.random_sample(log, "m:1", 101, 400, 100, seed=1)] == ids  # reproducible


def test_an_informative_batch_takes_the_least_sure_of_each_cluster_and_each_text_once(log):
    from core import predlog
    from labels import select

    rows = {r.id: r for r in predlog.unlabelled(log, "m:1", 1, limit=1000, with_embedding=True)}
    picked = select.informative_batch(log, "m:1", 1, 10, pool_rows=1000)
    assert len(picked) == 10 and len({c.log_id for c in picked}) == 10
    margins = [select.margin(json.loads(rows[c.log_id].probs)) for c in picked]
    all_margins = sorted(select.margin(json.loads(r.probs)) for r in rows.values())
    assert np.mean(margins) < np.percentile(all_margins, 10), "the batch is among the least sure rows"
    clusters = {json.loads(c.score)["cluster"] for c in picked}
    assert len(clusters) == 10, "one per cluster"
    sides = {int(np.frombuffer(rows[c.log_id].embedding, dtype=np.float32).mean() > 0) for c in picked}
    assert sides == {0, 1}, "spread over both regions of the embedding space, not piled on one"
    assert select.margin({"a": 0.5, "b": 0.5}) == 0 and select.margin({"a": 0.9, "b": 0.1}) == pytest.approx(0.8)


def test_duplicate_changed_late_and_skipped_answers(log):
    from sqlalchemy import select as sql_select

    from core import predlog
    from labels import answers, requests
    from labels.config import LabelsConfig

    config = LabelsConfig(request_ttl_h=1)
    old = dt.datetime.now(UTC) - dt.timedelta(hours=3)
    requests.create(log, [requests.Candidate(i, f"{i - 1:032x}") for i in (1, 2, 3)], model_version="m:1", kind="random",
                    purpose="confirmation", reason="t", config=config, now=old)
    requests.create(log, [requests.Candidate(4, f"{3:032x}")], model_version="m:1", kind="informative", purpose="training",
                    reason="t", config=config)
    assert requests.expire(log, config) == 3  # 1, 2, 3 are past their TTL
    names = {"m:1": LABELS}
    first = answers.apply(log, [answers.Answer(f"{0:032x}", "positive", annotator="ann"),  # late: still taken
                                answers.Answer(f"{1:032x}", None, skipped=True, annotator="ann"),
                                answers.Answer(f"{3:032x}", "negative", annotator="bob"),
                                answers.Answer("f" * 32, "positive"),
                                answers.Answer(f"{2:032x}", "neutral")], label_names=names)
    assert (first.recorded, first.skipped) == (2, 1)
    assert len(first.refused) == 2 and "not a label request" in first.refused[0] and "unknown label" in first.refused[1]
    again = answers.apply(log, [answers.Answer(f"{0:032x}", "positive", annotator="ann")], label_names=names)
    assert again.unchanged == 1
    changed = answers.apply(log, [answers.Answer(f"{0:032x}", "negative", annotator="ann")], label_names=names)
    assert changed.replaced == 1
    c = predlog.predictions.c
    with log.connect() as conn:
        rows = {r.request_id: r for r in conn.execute(sql_select(c.request_id, c.feedback_label, c.feedback_source, c.feedback_annotator))}
    assert tuple(rows[f"{0:032x}"][1:]) == ("negative", "requested-random", "ann")
    assert rows[f"{1:032x}"].feedback_label is None, "a skip is never a label"
    assert tuple(rows[f"{3:032x}"][1:]) == ("negative", "requested-informative", "bob")
    assert requests.lookup(log, f"{1:032x}")["status"] == "skipped" and requests.lookup(log, f"{0:032x}")["status"] == "answered"
    summary = requests.summary(log, config)
    assert (summary["answered"], summary["skipped"], summary["expired"], summary["pending"]) == (2, 1, 1, 0)


def test_confirmation_size_follows_the_policys_interval_arithmetic():
    from loop.policy import PolicyConfig, Signals, _performance_drop, confirmation_size

    policy = PolicyConfig()
    base = dict(now=dt.datetime.now(UTC), consecutive_drift=2, new_labels=0, last_retrain_at=None, retrains_last_24h=0,
                reference_accuracy=0.85, reference_n=1000, labelled_in_window=0, realized_accuracy=None)
    harmful = Signals(**base, estimated_accuracy=0.70)
    n = confirmation_size(harmful, policy)
    assert n == policy.min_labels  # a 15-point drop is decided by the minimum
    benign = Signals(**base, estimated_accuracy=0.80)
    n_benign = confirmation_size(benign, policy)
    assert n_benign > n
    # with n labels at the anticipated accuracy, the policy's own test decides (confirms the drop)
    for signals, size in ((harmful, n), (benign, n_benign)):
        at = Signals(**{**base, "labelled_in_window": size, "realized_accuracy": signals.estimated_accuracy},
                     estimated_accuracy=signals.estimated_accuracy)
        assert _performance_drop(at, policy)[0], (size, _performance_drop(at, policy)[1])
        fewer = Signals(**{**base, "labelled_in_window": int(size * 0.6), "realized_accuracy": signals.estimated_accuracy},
                        estimated_accuracy=signals.estimated_accuracy)
        if size > policy.min_labels:
            assert not _performance_drop(fewer, policy)[0], "fewer labels than the size would not have decided"
    # no n decides when the reference itself is too uncertain for the gap
    assert confirmation_size(Signals(**{**base, "reference_n": 20}, estimated_accuracy=0.84), policy) is None


def test_the_loop_asks_for_a_confirmation_sample_then_a_training_batch(log):
    from labels import requests
    from labels.config import LabelsConfig
    from loop.ask import ask
    from loop.policy import Decision, PolicyConfig, Signals

    config, policy = LabelsConfig(per_day=300, per_refinement=120), PolicyConfig()  # gate: 30 items at 0.3 = 100 unbiased
    verdict = SimpleNamespace(model_version="m:1", run_id=7, drift=True, window_first_id=101, window_last_id=600)
    signals = Signals(now=dt.datetime.now(UTC), consecutive_drift=1, realized_accuracy=None, labelled_in_window=0,
                      estimated_accuracy=0.70, reference_accuracy=0.85, reference_n=1000, new_labels=0, last_retrain_at=None,
                      retrains_last_24h=0)
    unconfirmed = Decision("skip", "drift not confirmed by performance", checks={"drift": False, "performance_drop": False})
    asked = ask(log, verdict, signals, unconfirmed, policy, config, streak_start=101)
    assert asked["confirmation"]["created"] == asked["confirmation"]["needed"] == 50
    assert ask(log, verdict, signals, unconfirmed, policy, config, streak_start=101) == {}, "one open batch at a time"

    warranted = Decision("skip", "only 0 new labels (< 100)", checks={"drift": True, "performance_drop": True, "labels_needed": 100})
    asked = ask(log, verdict, signals, warranted, policy, config, streak_start=101)
    training = asked["training"]
    # per_refinement 120; no unbiased label yet, so the gate's 100 decide the random part (over random_share's 36)
    assert training["random_for_gate"] == 100 and training["random"]["created"] == 100 and training["informative"]["created"] == 20
    summary = requests.summary(log, config)
    assert summary["by_kind"]["random"]["pending"] == 150 and summary["by_kind"]["informative"]["pending"] == 20
    assert summary["asked_last_24h"] == 170 <= config.per_day
    assert ask(log, verdict, signals, warranted, policy, config, streak_start=101) == {}
    assert ask(log, verdict, signals, warranted, policy, LabelsConfig(enabled=False), streak_start=101) == {}


def test_export_and_import_for_teams_with_another_tool(home, tmp_path):
    import csv

    from core import predlog
    from core.statedb import dispose_engine, get_engine
    from labels import requests
    from labels.config import LabelsConfig
    from tests.conftest import cli_json, run_cli

    url = f"sqlite:///{(home / 'state.db').resolve()}"
    engine = get_engine(url)
    predlog.ensure_schema(engine)
    predlog.write_batch(engine, "m:1", _rows(10, 0, np.random.default_rng(1)))
    requests.create(engine, [requests.Candidate(i, f"{i - 1:032x}") for i in (1, 2, 3)], model_version="m:1", kind="random",
                    purpose="confirmation", reason="t", config=LabelsConfig())
    dispose_engine(url)

    out = tmp_path / "queue.csv"
    proc = run_cli(["labels", "export", str(out)], home)
    assert proc.returncode == 0 and "exported 3 pending requests" in proc.stdout, proc.stderr
    exported = list(csv.DictReader(out.read_text(encoding="utf-8").splitlines()))
    assert [r["request_id"] for r in exported] == [f"{i:032x}" for i in range(3)] and exported[0]["text"] == "text 0"
    assert cli_json(["labels", "status"], home)["sent"] == 3

    # m:1 is no registered model, so its answer is refused in one line (the others still go through)
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(r) for r in [
        {"request_id": f"{0:032x}", "label": "positive", "annotator": "ann"},
        {"request_id": f"{1:032x}", "label": "", "annotator": "ann"},  # skipped
        {"request_id": "nope", "label": "positive"}]) + "\n", encoding="utf-8")
    proc = run_cli(["labels", "import", str(answers), "--json"], home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["skipped"] == 1 and any("not a label request" in r for r in result["refused"])
    assert any(r.startswith(f"{0:032x}: model 'm:1' not found") for r in result["refused"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request_id": "x", "label": "positive"}\nnot json\n', encoding="utf-8")
    proc = run_cli(["labels", "import", str(bad)], home)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and "bad.jsonl:2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(["labels", "export", str(tmp_path / "queue.txt")], home)
    assert proc.returncode == 2 and "csv or jsonl" in proc.stderr


class RecordingJobs:
    """RefineJobs' interface, recording the refinements the policy starts instead of spawning one
    (the refinement itself runs for real in tests/test_loop.py and tests/test_generations.py)."""

    def __init__(self):
        self.started = []

    def running(self) -> bool:
        return False

    def start(self, engine, refine, trigger, version, since_id=None, runs=None, wait=False, fence=None) -> bool:
        self.started.append((trigger, version, since_id))
        return True


@pytest.mark.parametrize("organic_arrives", [False, True])
def test_after_each_pass_the_loop_asks_then_waits_for_its_batch_then_refines(log, organic_arrives):
    """With no organic feedback at all: a drifted pass asks for a confirmation sample; its answers
    confirm the drop; the policy asks for a training batch; the refinement waits for the batch's
    answers, and starts once they are in. If organic feedback alone brings enough labels meanwhile,
    it starts then: an unanswered batch (no annotator, or a slow one) must not hold the loop for
    its 72-hour expiry (found by bench/loop.py, 50 % organic feedback and no annotation tool)."""
    import json as _json

    from sqlalchemy import insert

    from core import production
    from labels import answers, requests
    from labels.config import LabelsConfig
    from loop import act
    from loop.policy import PolicyConfig
    from loop.refine_config import RefineConfig
    from monitoring import store
    from monitoring.verdict import Quality, Verdict

    production.promote("m:1", reason="test", actor="test", engine=log, verify=False)
    store.ensure_schema(log)
    now = dt.datetime.now(UTC)
    for run in range(2):  # two drifted passes over the window: the drift streak starts at log id 1
        result = {"model_version": "m:1", "status": "ok", "drift": True, "window_size": 600, "window_first_id": 1,
                  "window_last_id": 600, "quality": {"labelled": 0}}
        with log.begin() as conn:
            conn.execute(insert(store.monitor_runs).values(finished_at=now, model_version="m:1", status="ok", drift=True,
                                                           window_size=600, window_first_id=1, window_last_id=600, labelled=0,
                                                           duration_s=0.1, result=_json.dumps(result)))
    verdict = Verdict(model_version="m:1", run_id=2, status="ok", drift=True, window_size=600, window_first_id=1, window_last_id=600,
                      quality=Quality(labelled=0, estimated_accuracy=0.70, estimated_accuracy_lower=0.68, estimated_accuracy_upper=0.72),
                      reference_accuracy=0.85, reference_n=1000)
    policy, refine, config, jobs = PolicyConfig(), RefineConfig(), LabelsConfig(), RecordingJobs()

    first = act.after_pass(log, verdict, policy, refine, jobs, labels=config)
    assert first["action"] == "skip" and "not confirmed" in first["reason"]
    assert first["labels_asked"]["confirmation"]["created"] == 50 and jobs.started == []

    def answer(kind: str, purpose: str, right_share: float) -> int:
        open_ = [r for r in requests.pending(log, 1000) if r["kind"] == kind and r["purpose"] == purpose]
        given = [answers.Answer(r["request_id"], r["label"] if i < right_share * len(open_) else
                                ("negative" if r["label"] == "positive" else "positive"), annotator="ann")
                 for i, r in enumerate(open_)]
        return answers.apply(log, given, label_names={"m:1": LABELS}).recorded

    assert answer("random", "confirmation", 0.5) == 50  # the annotator finds the model right half the time
    second = act.after_pass(log, verdict, policy, refine, jobs, labels=config)
    assert second["checks"]["performance_drop"] and second["checks"]["labels_needed"] == 50
    training = second["labels_asked"]["training"]
    assert training["random_for_gate"] == 50 and training["random"]["created"] == 60 and training["informative"]["created"] == 140
    assert "labels_asked" not in act.after_pass(log, verdict, policy, refine, jobs, labels=config), "one open batch at a time"

    assert answer("random", "training", 1.0) == 60  # enough labels now (110), but 140 of the batch are still out
    waiting = act.after_pass(log, verdict, policy, refine, jobs, labels=config)
    assert waiting["action"] == "skip" and waiting["reason"].startswith("waiting for 140 requested training labels")
    assert jobs.started == []
    if organic_arrives:
        from core import predlog

        asked = requests.asked_since(log, "m:1", 1)
        organic = [r for r in (f"{i:032x}" for i in range(600)) if r not in asked][:100]
        predlog.record_feedback(log, [(r, "positive") for r in organic], lambda v: LABELS)
        go = act.after_pass(log, verdict, policy, refine, jobs, labels=config)
        assert go["action"] == "retrain" and go["started"] is True, go["reason"]
        assert requests.open_requests(log, "m:1", "training") == 140  # its answers train the next refinement
        return
    assert answer("informative", "training", 1.0) == 140
    go = act.after_pass(log, verdict, policy, refine, jobs, labels=config)
    assert go["action"] == "retrain" and go["started"] is True and jobs.started[0][1:] == ("m:1", 1)
    assert requests.summary(log, config)["asked"] == 250 <= config.per_day


def test_a_window_with_too_few_labels_for_the_policy_reads_the_models_measured_error(log):
    """Review finding: a window with 30-49 labels (enough for the monitor to measure the estimate's
    error, too few for the policy to use it) made the estimate unable to confirm, while a window with
    none could. Now the model-wide measurement is used then."""
    from core import predlog
    from core import audit
    from loop import act
    from monitoring import store
    from monitoring.verdict import Quality, Verdict

    store.ensure_schema(log)
    audit.ensure_schema(log)
    ids = [f"{i:032x}" for i in range(300)]
    predlog.record_feedback(log, [(rid, "positive") for rid in ids[:120]], lambda v: LABELS)  # 120 labels of this model
    verdict = Verdict(model_version="m:1", run_id=1, status="ok", drift=True, window_size=100, window_first_id=200, window_last_id=300,
                      quality=Quality(labelled=40, estimated_accuracy=0.7, estimation_error=0.05), reference_accuracy=0.85,
                      reference_n=1000)
    signals = act.gather_signals(log, verdict, RecordingJobs(), min_labels=50)
    assert signals.estimation_error_n == 120 and signals.estimation_error == pytest.approx(predlog.estimation_error(log, "m:1")[0])
    enough = Verdict(**{**verdict.__dict__, "quality": Quality(labelled=60, estimated_accuracy=0.7, estimation_error=0.05)})
    signals = act.gather_signals(log, enough, RecordingJobs(), min_labels=50)
    assert (signals.estimation_error, signals.estimation_error_n) == (0.05, 60)
