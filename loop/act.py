"""The loop's step after every monitor pass: bake check, the policy, and maybe a refinement.

`after_pass` takes the pass's typed `Verdict`, gathers the policy's signals from the state DB
(`gather_signals`), lets the pure `policy.decide` choose, and starts a refinement through the
caller's `RefineJobs` when it says retrain. Every decision, skip included, is audited.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.engine import Engine

from core import alias, audit, predlog
from labels import requests
from labels.config import LabelsConfig
from loop.ask import ask
from loop.bake import ShadowScorer, bake_check, in_bake
from loop.lease import Fence
from loop.policy import PolicyConfig, Signals, decide
from loop.refine_config import RefineConfig
from loop.refine_jobs import RefineJobs
from monitoring import store
from monitoring.verdict import Verdict


def drift_streak(engine: Engine, version: str) -> tuple[int | None, list[int]]:
    """(first log id, run ids) of the current streak of drifted passes of `version`."""
    first, runs = None, []
    for row in store.recent(engine, limit=200, model_version=version):
        if row["status"] != "ok":
            continue
        if not row["drift"]:
            break
        runs.append(row["run_id"])
        first = row["window_first_id"] if first is None else min(first, row["window_first_id"])
    return first, runs[::-1]


def gather_signals(engine: Engine, verdict: Verdict, jobs: RefineJobs, now: dt.datetime | None = None,
                   min_labels: int | None = None) -> Signals:
    """The policy's inputs: this pass's quality and reference, and the loop's history in the state DB.
    When the window holds fewer than `min_labels` unbiased labels, the realized accuracy is read over
    the whole drift streak instead: a confirmation sample's answers arrive after its window has moved
    on, and they are a uniform sample of the streak's traffic all the same."""
    now = now or dt.datetime.now(dt.timezone.utc)
    version = verdict.model_version
    q = verdict.quality
    realized, labelled = q.realized_accuracy, q.labelled
    last = audit.last(engine, "retrain_started")
    last_at = dt.datetime.fromisoformat(last["at"]) if last else None
    # count the labels a refinement would train on: those of the current drift streak (else since the last retrain)
    streak_start, _ = drift_streak(engine, version)
    if min_labels is not None and labelled < min_labels and streak_start is not None:
        streak_accuracy, streak_n = predlog.unbiased_accuracy(engine, version, streak_start)
        if streak_n > labelled:
            realized, labelled = streak_accuracy, streak_n
    # the estimate's error: on this window's labelled rows when they are enough for the policy to use it,
    # else on this model's newest labelled traffic (which holds the window's too). A window's own
    # measurement on fewer than min_labels rows (the monitor measures from 30) would stop the estimate
    # from confirming, where the model-wide one on more rows could.
    if q.estimation_error is not None and (min_labels is None or q.labelled >= min_labels):
        error, error_n = q.estimation_error, q.labelled
    else:
        error, error_n = predlog.estimation_error(engine, version)
    return Signals(
        now=now, consecutive_drift=store.consecutive_drift(engine, version),
        realized_accuracy=realized, labelled_in_window=labelled,
        estimated_accuracy=q.estimated_accuracy, reference_accuracy=verdict.reference_accuracy,
        # with text: a refinement trains on texts, so labels of a hash-only log never make one start
        new_labels=predlog.labelled_count(engine, version, last_at, streak_start, with_text=True), last_retrain_at=last_at,
        retrains_last_24h=audit.count_since(engine, "retrain_started", now - dt.timedelta(hours=24)),
        retrain_running=jobs.running(), reference_n=verdict.reference_n, estimated_se=q.estimated_se,
        estimation_error=error, estimation_error_n=error_n, in_first_bake=in_bake(engine, version) is not None,
    )


def after_pass(engine: Engine, verdict: Verdict, policy: PolicyConfig, refine: RefineConfig, jobs: RefineJobs, *,
               fence: Fence | None = None, scorer: ShadowScorer | None = None, labels: LabelsConfig | None = None) -> dict:
    """Bake check, then the policy on this pass's signals; may start a refinement in `jobs`, or ask
    for the labels the policy lacks (loop/ask.py, when `labels` is given). Returns the decision.
    `fence` is the leader's term (None for a lone process such as a test); `scorer` keeps the bake's
    shadow model between passes."""
    version = verdict.model_version
    current = alias.current(engine=engine)
    if current is None or current.tag != version or not verdict.has_verdict:
        reason = (f"the pass monitored {version}, not the production model" if current is None or current.tag != version
                  else f"no verdict ({verdict.window_size} predictions in the window)")
        decision = {"action": "skip", "reason": reason}
        audit.record(engine, "policy", version, run_id=verdict.run_id, **decision)
        return decision
    baked = bake_check(engine, verdict, policy, scorer=scorer, fence=fence)
    if baked == "rollback":
        decision = {"action": "skip", "reason": "rolled back the new champion (bake failed)"}
        audit.record(engine, "policy", version, run_id=verdict.run_id, **decision)
        return decision
    signals = gather_signals(engine, verdict, jobs, min_labels=policy.min_labels)
    d = decide(signals, policy)
    out = {**d.to_json(), "signals": signals.to_json(), "run_id": verdict.run_id}
    since_id, runs = drift_streak(engine, version)
    waiting = requests.open_requests(engine, version, "training") if labels is not None and labels.enabled else 0
    if waiting and d.action == "retrain" and signals.new_labels - requests.answered_requests(engine, version) >= policy.min_new_labels:
        waiting = 0  # organic feedback alone is enough: go now; the batch's answers train the next refinement
    if d.action == "retrain" and not d.dry_run and waiting:
        # a training batch is out: start when its answers are in (or expired), not on its first ones
        out.update(action="skip", reason=f"waiting for {waiting} requested training labels (or their expiry); trigger was: {d.reason}")
    elif d.action == "retrain" and not d.dry_run:
        if policy.mode in ("schedule", "performance"):
            since_id = None
        started = jobs.start(engine, refine, d.reason, version, since_id, runs, fence=fence)
        out["started"] = started
    elif labels is not None and not d.dry_run:
        asked = ask(engine, verdict, signals, d, policy, labels, since_id, refine)
        if asked:
            out["labels_asked"] = asked
    audit.record(engine, "policy", version, **out)
    return out
