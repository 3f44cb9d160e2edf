"""The controller's refinement jobs: one `driftloop refine` child process at a time.

The refinement runs as a child process (`driftloop refine --json`), in a thread of the controller, so
monitor passes and the service never wait for it. Its outcome is recorded in the audit trail
(core/audit.py) and counted on the controller's /metrics.

The child dies with the controller (Linux parent-death signal), so a controller killed mid-refinement
leaves no orphan that could register or promote later; the next controller to lead calls
`RefineJobs.recover_interrupted` to record that refinement as failed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import subprocess
import sys
import threading
from pathlib import Path

from sqlalchemy.engine import Engine

from core import audit
from core.home import runs_dir
from core.lifecycle import die_with_parent
from loop.lease import Fence
from loop.refine_config import RefineConfig
from monitoring import exporter

log = logging.getLogger("driftloop.loop")
INTERRUPTED = "interrupted: the controller stopped during the refinement"
REPO_ROOT = Path(__file__).resolve().parent.parent  # the child runs `python -m driftloop` from here
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


class RefineJobs:
    """At most one refinement at a time, for whoever owns this object (the controller's leadership,
    or a `driftloop retrain` process): `start` returns False while one runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def running(self) -> bool:
        return self._lock.locked()

    def start(self, engine: Engine, refine: RefineConfig, trigger: str, version: str, since_id: int | None = None,
              runs: list[int] | None = None, wait: bool = False, fence: Fence | None = None) -> bool:
        """Start a refinement unless one runs; False if one was running. `fence`: the leader's term, which
        the child checks when it promotes."""
        if not self._lock.acquire(blocking=False):
            return False
        cmd = refine_command(refine, trigger, since_id, runs or [], fence)
        thread = threading.Thread(target=self._run, args=(engine, cmd, version), name="driftloop-refine", daemon=True)
        thread.start()
        if wait:
            thread.join()
        return True

    def stop(self, timeout: float = 30) -> None:
        """On controller shutdown: stop a running refinement (it registers nothing partial) and wait."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()

    def recover_interrupted(self, engine: Engine, limit: int = 1000) -> int:
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
        if self.running():
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

    def _run(self, engine: Engine, cmd: list[str], version: str) -> None:
        latest = audit.history(engine, limit=1)
        start_id = latest[0]["id"] if latest else 0
        try:
            exporter.RETRAINS.labels(outcome="started").inc()
            log_dir = runs_dir()
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
            with open(log_dir / f"refine-{stamp}.log", "w") as err:
                # this thread starts the child and waits for it: see core.lifecycle.die_with_parent
                self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                              cwd=str(REPO_ROOT), preexec_fn=die_with_parent(signal.SIGKILL))
                out, _ = self._proc.communicate()
            code = self._proc.returncode
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
            self._proc = None
            self._lock.release()
