"""The loop asks for the labels it needs, after each monitor pass (loop/act.py), within the budget.

- **Confirmation**: the pass drifted and performance is not confirmed (labels short): ask at once
  for a uniform random sample of the drifted window, as many as the policy's interval arithmetic
  needs to confirm or refute a drop of `policy.tolerance` (`policy.confirmation_size`), less the
  unbiased labels the window already has, capped by `labels.confirm_max`.
- **Training**: the policy says a refinement is warranted but for labels (`labels_needed`): ask
  for a training batch of `labels.per_refinement` (what that refinement may cost): a uniform
  random part of the drift streak, at least `labels.random_share` of it and at least what the
  gate needs (`gate.min_gate_items / gate_fraction` unbiased labels in all: the gate scores only
  those), and the rest informative (labels/select.py). The refinement waits for the batch
  (loop/act.py) rather than start on its first answers and meet a gate that cannot decide.

One open batch of each purpose per model at a time: while one waits for answers, nothing more is
asked. Everything asked is recorded in the request queue (labels/requests.py) and this pass's
audit event; the answers come back through labels/answers.py.
"""

from __future__ import annotations

import datetime as dt
import math

from sqlalchemy.engine import Engine

from core import audit, predlog
from labels import requests, select
from labels.config import LabelsConfig
from loop.policy import Decision, PolicyConfig, Signals, confirmation_size
from loop.refine_config import RefineConfig
from monitoring.verdict import Verdict


def ask(engine: Engine, verdict: Verdict, signals: Signals, decision: Decision, policy: PolicyConfig, config: LabelsConfig,
        streak_start: int | None, refine: RefineConfig | None = None, now: dt.datetime | None = None) -> dict:
    """Create the requests this pass calls for; returns what was asked (empty when nothing)."""
    if not config.enabled:
        return {}
    version, out = verdict.model_version, {}
    if verdict.drift and not decision.checks.get("performance_drop") and verdict.window_first_id is not None:
        needed = confirmation_size(signals, policy)
        have = signals.labelled_in_window
        if needed is not None and have < needed and requests.open_requests(engine, version, "confirmation") == 0:
            want = min(needed - have, config.confirm_max)
            picked = select.random_sample(engine, version, verdict.window_first_id, verdict.window_last_id, want,
                                          seed=f"{version}:{verdict.run_id}",
                                          exclude=requests.asked_since(engine, version, verdict.window_first_id))
            reason = (f"confirm the drift of monitor run {verdict.run_id}: {needed} random labels decide a "
                      f"{policy.tolerance:.0%} drop at alpha {policy.alpha} (the window has {have})")
            out["confirmation"] = {**requests.create(engine, picked, model_version=version, kind="random", purpose="confirmation",
                                                     reason=reason, config=config, now=now).to_json(), "needed": needed}
    short = decision.checks.get("labels_needed")
    if short and requests.open_requests(engine, version, "training") == 0:
        start = streak_start if streak_start is not None else max(0, (verdict.window_first_id or 0))
        last = audit.last(engine, "retrain_started")
        since = dt.datetime.fromisoformat(last["at"]) if last else None
        refine = refine or RefineConfig()
        total = config.per_refinement
        _, unbiased = predlog.unbiased_accuracy(engine, version, start)
        for_gate = max(0, math.ceil(refine.gate.min_gate_items / refine.gate_fraction) - unbiased)
        n_random = min(total, max(round(total * config.random_share), for_gate))
        reason = f"training batch for a warranted refinement: {short} labels short ({decision.reason[:160]})"
        asked_before = requests.asked_since(engine, version, start)
        randoms = select.random_sample(engine, version, start, predlog.max_id(engine), n_random, seed=f"{version}:{verdict.run_id}:t",
                                       exclude=asked_before)
        made_random = requests.create(engine, randoms, model_version=version, kind="random", purpose="training",
                                      reason=reason, config=config, training_since=since, now=now)
        informative = select.informative_batch(engine, version, start, total - made_random.created, config.pool_rows,
                                               exclude=asked_before | {c.request_id for c in randoms}, seed=verdict.run_id or 0)
        made_informative = requests.create(engine, informative, model_version=version, kind="informative", purpose="training",
                                           reason=reason, config=config, training_since=since, now=now, batch=made_random.batch)
        out["training"] = {"random": made_random.to_json(), "informative": made_informative.to_json(), "short": short,
                           "random_for_gate": for_gate}
    return out
