"""The closed loop's step after every monitor pass: bake check, policy, and maybe a refinement.

The refinement runs as a child process (`driftloop refine --json`), one at a time, in a thread of
the controller, so monitor passes and the service never wait for it. Everything is recorded in the
audit trail (finetune/audit.py) and counted on the controller's /metrics.

The child dies with the controller (Linux parent-death signal), so a controller killed mid-refinement
leaves no orphan that could register or promote later; the next controller to lead calls
`recover_interrupted` to record that refinement as failed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from finetune import alias, audit, production, registry
from finetune.errors import DriftloopError
from finetune.home import runs_dir
from monitoring import exporter, predlog, store
from monitoring.lease import Fence
from monitoring.paired import PairedComparison, mcnemar_one_sided
from monitoring.policy import PolicyConfig, Signals, decide
from monitoring.refine import RefineConfig

log = logging.getLogger("driftloop.loop")
_refine_lock = threading.Lock()
_refine_proc: subprocess.Popen | None = None
INTERRUPTED = "interrupted: the controller stopped during the refinement"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn that makes the child die (SIGKILL) when the thread that started it dies; None off Linux.

    Why this and not the child watching its parent's pid: the kernel delivers the signal the moment the
    controller dies, even by SIGKILL or the OOM killer, with no polling and no change to `driftloop
    refine`. The Python docs warn that preexec_fn is unsafe with threads (the controller has several):
    the forked child holds only the forking thread, so a preexec_fn that takes a lock another thread
    held at fork time deadlocks. This one takes none: libc and `prctl` are resolved here, in the parent,
    and the child only makes two syscalls (prctl, getppid) and maybe a kill; no import, allocation-heavy
    code or logging runs between fork and exec. Caveats: the signal follows the *thread* that forked, so
    the Popen must be made by a thread that outlives the child (`_run_refine` waits on it in the same
    thread); elsewhere than Linux nothing is set and `recover_interrupted` still closes the audit trail.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect: the signal will never come
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def refine_running() -> bool:
    return _refine_lock.locked()


def _labels_since(engine: Engine, version: str, since: dt.datetime | None, from_id: int | None = None) -> int:
    """Labelled predictions of `version` (labelled after `since`, on log rows from `from_id` on)."""
    c = predlog.predictions.c
    q = select(func.count()).select_from(predlog.predictions).where(c.model_version == version, c.feedback_label.is_not(None))
    if since is not None:
        q = q.where(c.feedback_at >= since)
    if from_id is not None:
        q = q.where(c.id >= from_id)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


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


def in_bake(engine: Engine, version: str) -> dict | None:
    """The promotion event of `version` while its bake has not decided yet, else None (also for a
    first model: with no previous champion there is nothing to bake against)."""
    promo = audit.last(engine, "promotion")
    if promo is None or promo["model_version"] != version or not promo.get("previous"):
        return None
    done = audit.history(engine, limit=20, kinds=("bake_passed", "rollback"))
    if any(e["id"] > promo["id"] and e["model_version"] == version for e in done):
        return None
    return promo


def gather_signals(engine: Engine, latest: dict, now: dt.datetime | None = None) -> Signals:
    now = now or dt.datetime.now(dt.timezone.utc)
    version = latest["model_version"]
    q = latest.get("quality") or {}
    ref = latest.get("reference") or {}
    last = audit.last(engine, "retrain_started")
    last_at = dt.datetime.fromisoformat(last["at"]) if last else None
    # count the labels a refinement would train on: those of the current drift streak (else since the last retrain)
    streak_start, _ = drift_streak(engine, version)
    # the estimate's error: on this window's labelled rows when the pass measured it, else on all of this model's
    if q.get("estimation_error") is not None:
        error, error_n = q["estimation_error"], int(q.get("labelled") or 0)
    else:
        error, error_n = predlog.estimation_error(engine, version)
    est_lo, est_hi = q.get("estimated_accuracy_lower"), q.get("estimated_accuracy_upper")
    return Signals(
        now=now, consecutive_drift=store.consecutive_drift(engine, version),
        realized_accuracy=q.get("realized_accuracy"), labelled_in_window=int(q.get("labelled") or 0),
        estimated_accuracy=q.get("estimated_accuracy"), reference_accuracy=ref.get("accuracy"),
        new_labels=_labels_since(engine, version, last_at, streak_start), last_retrain_at=last_at,
        retrains_last_24h=audit.count_since(engine, "retrain_started", now - dt.timedelta(hours=24)),
        retrain_running=refine_running(), reference_n=int(ref.get("accuracy_n") or 0),
        estimated_se=(est_hi - est_lo) / (2 * 1.959964) if est_lo is not None and est_hi is not None else None,
        estimation_error=error, estimation_error_n=error_n, in_first_bake=in_bake(engine, version) is not None,
    )


class ShadowScorer:
    """The previous champion, loaded in the controller for the bake: it scores the same labelled items
    the new champion served. Keeps one model at a time and drops it once the bake has decided."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._tag: str | None = None
        self._predictor = None

    def correct(self, tag: str, texts: list[str], labels: list[str]) -> list[bool]:
        if self._tag != tag:
            self._predictor, self._tag = registry.load_predictor(tag, device=self.device), tag
        out = self._predictor.predict(texts)
        names = self._predictor.label_names
        return [names[i] == y for i, y in zip(out.labels, labels)]

    def release(self) -> None:
        self._tag = self._predictor = None


def bake_check(engine: Engine, latest: dict, policy: PolicyConfig, *, scorer: ShadowScorer | None = None,
               fence: Fence | None = None) -> str | None:
    """After a promotion: once the new champion has `bake_labels` labelled items, the previous champion
    scores the same items and one paired test decides: roll back if the new one is significantly
    worse (exact one-sided McNemar at `bake_alpha`), else the bake passes. Decided once per promotion."""
    version = latest["model_version"]
    promo = in_bake(engine, version)
    if promo is None:
        return None
    previous = promo["previous"]
    items = predlog.labelled_after(engine, version, dt.datetime.fromisoformat(promo["at"]), policy.bake_labels)
    if len(items) < policy.bake_labels:
        return None
    scorer = scorer or ShadowScorer()
    texts, truth = [t for t, _, _ in items], [f for _, _, f in items]
    try:
        old = scorer.correct(previous, texts, truth)
    except DriftloopError as err:  # the previous model is gone from the store: nothing to compare or return to
        log.warning("bake of %s: previous champion %s cannot score (%s); bake passed by default", version, previous, err)
        audit.record(engine, "bake_passed", version, previous=previous, skipped=str(err))
        return "bake_passed"
    finally:
        scorer.release()
    cmp = PairedComparison.of(old, [served == f for _, served, f in items])
    p_worse = mcnemar_one_sided(cmp.losses, cmp.gains)  # evidence that the previous champion is better
    details = {"previous": previous, "paired": cmp.to_json(), "p_value_worse": p_worse, "alpha": policy.bake_alpha}
    if p_worse <= policy.bake_alpha:
        reason = (f"bake: on the same {cmp.n} labelled items the new champion scored {cmp.candidate_accuracy:.3f}, the previous "
                  f"{cmp.incumbent_accuracy:.3f} ({cmp.losses} lost, {cmp.gains} gained, McNemar p={p_worse:.3g} <= {policy.bake_alpha})")
        try:
            production.rollback(reason=reason, actor="controller", engine=engine,
                                fence=fence.check if fence else None, **details)
        except DriftloopError as err:
            log.warning("bake rollback of %s refused: %s", version, err)
            return None
        exporter.ROLLBACKS.inc()
        return "rollback"
    audit.record(engine, "bake_passed", version, **details)
    return "bake_passed"


def refine_command(refine: RefineConfig, trigger: str, since_id: int | None, runs: list[int], fence: Fence | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "driftloop", "refine", "--json", "--quiet", "--trigger", trigger,
           "--config-json", refine.model_dump_json(), "--monitor-runs", ",".join(map(str, runs)) or "none"]
    if since_id is not None:
        cmd += ["--since-id", str(since_id)]
    if fence is not None:
        cmd += ["--fence", fence.to_arg()]
    return cmd


def _child_outcome(engine: Engine, after_id: int, kind: str = "retrain_succeeded") -> dict | None:
    """The outcome the refinement process recorded itself (retrain_succeeded when done, retrain_failed
    when it refused with a one-line error)."""
    for e in audit.history(engine, limit=20, kinds=(kind,)):
        if e["id"] > after_id:
            return e
    return None


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
    return f"exit code {code}"


def _run_refine(engine: Engine, cmd: list[str], version: str) -> None:
    global _refine_proc
    latest = audit.history(engine, limit=1)
    start_id = latest[0]["id"] if latest else 0
    try:
        exporter.RETRAINS.labels(outcome="started").inc()
        log_dir = runs_dir()
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        with open(log_dir / f"refine-{stamp}.log", "w") as err:
            # this thread starts the child and waits for it: see _pdeathsig_preexec
            _refine_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                            cwd=str(Path(__file__).resolve().parent.parent),
                                            preexec_fn=_pdeathsig_preexec())
            out, _ = _refine_proc.communicate()
        code = _refine_proc.returncode
        if code != 0 and _child_outcome(engine, start_id) is not None:
            # it finished its work (registered, gated, maybe promoted) and was stopped while exiting
            log.info("refinement stopped (exit %s) after recording its outcome; counted as succeeded", code)
            outcome = _child_outcome(engine, start_id)
            exporter.RETRAINS.labels(outcome="succeeded").inc()
            if outcome.get("promoted"):
                exporter.PROMOTIONS.inc()
        elif code == 0:
            summary = json.loads(out.strip().splitlines()[-1])
            exporter.RETRAINS.labels(outcome="succeeded").inc()
            if summary.get("promoted"):
                exporter.PROMOTIONS.inc()
            log.info("refinement done: %s promoted=%s", summary.get("challenger"), summary.get("promoted"))
        else:
            exporter.RETRAINS.labels(outcome="failed").inc()
            if _child_outcome(engine, start_id, "retrain_failed") is None:  # else it recorded why itself
                audit.record(engine, "retrain_failed", version, exit_code=code, reason=_exit_reason(code),
                             log=str(log_dir / f"refine-{stamp}.log"))
            log.error("refinement failed (%s), see %s", _exit_reason(code), log_dir / f"refine-{stamp}.log")
    except Exception as err:  # noqa: BLE001 - a failed job is recorded, the controller keeps running
        exporter.RETRAINS.labels(outcome="failed").inc()
        audit.record(engine, "retrain_failed", version, error=f"{type(err).__name__}: {err}")
        log.exception("refinement job crashed")
    finally:
        _refine_proc = None
        _refine_lock.release()


def start_refine(engine: Engine, refine: RefineConfig, trigger: str, version: str, since_id: int | None = None,
                 runs: list[int] | None = None, wait: bool = False, fence: Fence | None = None) -> bool:
    """Start a refinement unless one runs; False if one was running. `fence`: the leader's term, which
    the child checks when it promotes."""
    if not _refine_lock.acquire(blocking=False):
        return False
    thread = threading.Thread(target=_run_refine, args=(engine, refine_command(refine, trigger, since_id, runs or [], fence), version),
                              name="driftloop-refine", daemon=True)
    thread.start()
    if wait:
        thread.join()
    return True


def stop_refine(timeout: float = 30) -> None:
    """On controller shutdown: stop a running refinement (it registers nothing partial) and wait."""
    proc = _refine_proc
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def recover_interrupted(engine: Engine, limit: int = 1000) -> int:
    """Record `retrain_failed` for each refinement a stopped controller left open; returns how many.

    A controller killed mid-refinement (its child dies with it) leaves a `retrain_started` with no
    outcome. Refinements run one at a time, so in id order a start is closed by the next outcome event;
    a start followed by another start, or by nothing, was interrupted. The controller calls this when
    it becomes the leader. It does nothing while a refinement runs in this process. A `driftloop refine`
    started by hand in another process at that very moment would be marked too (its own outcome follows
    later in the trail). Each recovery names its start (`started_id`), so calling this twice records once.
    A refinement refused before it started (too few labels) records an outcome with no start; if one
    follows an interrupted start it closes it, so the trail may miss a failure but never doubles one.
    """
    if refine_running():
        return 0
    events = audit.history(engine, limit=limit, kinds=("retrain_started", "retrain_succeeded", "retrain_failed"))[::-1]
    recovered = {e.get("started_id") for e in events if e["kind"] == "retrain_failed" and e.get("reason") == INTERRUPTED}
    open_starts, current = [], None
    for e in events:
        if e["kind"] == "retrain_started":
            if current is not None:
                open_starts.append(current)
            current = e
        else:
            current = None
    if current is not None:
        open_starts.append(current)
    count = 0
    for start in open_starts:
        if start["id"] in recovered:
            continue
        audit.record(engine, "retrain_failed", start.get("model_version"), reason=INTERRUPTED, started_id=start["id"],
                     started_at=start["at"], trigger=start.get("trigger"))
        exporter.RETRAINS.labels(outcome="failed").inc()
        log.warning("refinement started at %s (audit id %s) was interrupted: recorded as failed", start["at"], start["id"])
        count += 1
    return count


def after_pass(engine: Engine, latest: dict, policy: PolicyConfig, refine: RefineConfig, *, fence: Fence | None = None,
               scorer: ShadowScorer | None = None) -> dict:
    """Bake check, then the policy on this pass's signals; may start a refinement. Returns the decision.
    `fence` is the leader's term (None for a lone process such as a test); `scorer` keeps the bake's
    shadow model between passes."""
    version = latest["model_version"]
    current = alias.current(engine=engine)
    if current is None or current.tag != version or latest.get("status") != "ok":
        reason = (f"the pass monitored {version}, not the production model" if current is None or current.tag != version
                  else f"no verdict ({latest.get('window_size')} predictions in the window)")
        decision = {"action": "skip", "reason": reason}
        audit.record(engine, "policy", version, run_id=latest.get("run_id"), **decision)
        return decision
    baked = bake_check(engine, latest, policy, scorer=scorer, fence=fence)
    if baked == "rollback":
        decision = {"action": "skip", "reason": "rolled back the new champion (bake failed)"}
        audit.record(engine, "policy", version, run_id=latest.get("run_id"), **decision)
        return decision
    signals = gather_signals(engine, latest)
    d = decide(signals, policy)
    out = {**d.to_json(), "signals": signals.to_json(), "run_id": latest.get("run_id")}
    if d.action == "retrain" and not d.dry_run:
        since_id, runs = drift_streak(engine, version)
        if policy.mode in ("schedule", "performance"):
            since_id = None
        started = start_refine(engine, refine, d.reason, version, since_id, runs, fence=fence)
        out["started"] = started
    audit.record(engine, "policy", version, **out)
    return out
