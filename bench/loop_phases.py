"""The pieces of bench/loop.py: data splits, the champion, one service + one controller on one home
(`Stack`), the audit-trail readers, and the two long modes, a sequence of phases and a simulated day.

bench/loop.py is the command line (its docstring says what each mode measures); this module reads
DRIFTLOOP_HOME only through `use_home`, so each mode runs on a home of its own.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from driftloop.demo import held_out_accuracy, write_tsv
from driftloop.procs import Proc, free_port
from driftloop.replay import ReplayStats, labelled_rows, replay

ROOT = Path(__file__).resolve().parent.parent
Rows = list[tuple[str, str]]
Say = Callable[[str], None]
DOMAIN_FILES = {"yelp": "reviews/yelp_labelled.txt", "imdb": "reviews/imdb_labelled.txt", "finance": "finance/fpb_labelled.txt"}
SOURCE = "sst2"  # the champion's training domain; its held-out rows are SST-2 test.tsv
CONTROLLER_ARGS = ["--monitor-interval", "5", "--window", "250", "--min-samples", "200"]
REFINE_KINDS = ("retrain_started", "retrain_succeeded", "retrain_failed")


# --- data -------------------------------------------------------------------------------------------

def split_domain(rows: Rows, traffic: int, seed: int = 1) -> tuple[Rows, Rows]:
    """Shuffle, then (up to `traffic` rows, at most 2/3 of them: sent; the rest: held out, never sent)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n = min(traffic, len(rows) * 2 // 3)
    return rows[:n], rows[n:]


@dataclass
class Corpus:
    train: Rows  # the champion's training rows (SST-2 train)
    stable: Rows  # disjoint SST-2 train rows: the stable traffic
    traffic: dict[str, Rows]  # per domain: the rows that may be sent
    held: dict[str, Rows]  # per domain: rows never sent (SST-2: test.tsv)


def load_corpus(data: Path, domains: list[str], *, train_rows: int, stable: int, shift_traffic: int,
                sst2_traffic: int | None = None, extra: dict[str, Rows] | None = None) -> Corpus:
    """SST-2 (train, stable, traffic: disjoint slices of train.tsv; held out: test.tsv) and each named domain."""
    sst2 = labelled_rows(str(data / "sst2" / "train.tsv"))
    random.Random(0).shuffle(sst2)
    rest = sst2[train_rows + stable:]
    corpus = Corpus(sst2[:train_rows], sst2[train_rows:train_rows + stable],
                    {SOURCE: rest[:sst2_traffic or shift_traffic]}, {SOURCE: labelled_rows(str(data / "sst2" / "test.tsv"))})
    sources = {n: labelled_rows(str(data / DOMAIN_FILES[n])) for n in domains if n in DOMAIN_FILES}
    for name, rows in {**sources, **(extra or {})}.items():
        corpus.traffic[name], corpus.held[name] = split_domain(rows, shift_traffic)
    return corpus


def use_home(home: Path) -> None:
    """Point this process (and the children it starts) at `home`, dropping cached DB engines."""
    from core.statedb import dispose_engines  # noqa: PLC0415

    os.environ["DRIFTLOOP_HOME"] = str(home)
    dispose_engines()


def train_champion(home: Path, rows: Rows, say: Say) -> str:
    """The champion: SST-2 rows, 1 epoch, 20 % validation, promoted."""
    home.mkdir(parents=True, exist_ok=True)
    write_tsv(home / "train.tsv", rows)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "driftloop", "train", "--data", str(home / "train.tsv"), "--epochs", "1", "--quiet",
                          "--json", "--promote", "always", "--set", "data.val_fraction=0.2", "--set", "report=false"],
                         cwd=ROOT, env={**os.environ, "DRIFTLOOP_HOME": str(home)}, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"training the champion failed:\n{out.stderr[-3000:]}")
    champion = json.loads(out.stdout)["model"]
    say(f"champion {champion} trained on {len(rows)} SST-2 rows in {time.perf_counter() - t0:.0f}s")
    return champion


# --- models -----------------------------------------------------------------------------------------

class Models:
    """Held-out accuracy (cached per model and domain) and lineage summaries of registered models."""

    def __init__(self, held: dict[str, Rows]):
        self.held = held
        self._acc: dict[tuple[str, str], float] = {}

    def accuracy(self, tag: str, domain: str) -> float:
        if (tag, domain) not in self._acc:
            self._acc[tag, domain] = held_out_accuracy(tag, self.held[domain])
        return self._acc[tag, domain]

    def scores(self, tag: str, domains: list[str]) -> dict[str, float]:
        return {d: self.accuracy(tag, d) for d in domains}

    @staticmethod
    @functools.cache
    def lineage(tag: str) -> dict:
        from core import registry  # noqa: PLC0415

        return registry.get(tag).lineage

    def generation(self, tag: str) -> int:
        """data_lineage.generation when recorded, else the length of the parent chain."""
        from core.errors import DriftloopError  # noqa: PLC0415

        recorded = (self.lineage(tag).get("data_lineage") or {}).get("generation")
        if recorded is not None:
            return int(recorded)
        n, parent = 0, self.lineage(tag).get("parent")
        while parent:
            n += 1
            try:
                parent = self.lineage(parent).get("parent")
            except DriftloopError:
                break
        return n

    def summary(self, tag: str) -> dict:
        """generation, replay rows by generation (tag → rows) and regression-suite size (None where not recorded)."""
        dl = self.lineage(tag).get("data_lineage") or {}
        suite = dl.get("regression_suite")
        return {"generation": self.generation(tag), "replay_by_generation": dl.get("replay_by_generation"),
                "regression_suite_rows": suite.get("rows") if isinstance(suite, dict) else None}


# --- traffic ----------------------------------------------------------------------------------------

@dataclass
class Tally:
    """Requests of one phase or hour, summed over several replays."""

    sent: int = 0
    ok: int = 0
    errors: int = 0
    correct: int = 0
    versions: dict[str, int] = field(default_factory=dict)

    def add(self, st: ReplayStats | Tally) -> Tally:
        self.sent, self.ok, self.errors, self.correct = self.sent + st.sent, self.ok + st.ok, self.errors + st.errors, self.correct + st.correct
        for v, n in st.versions.items():
            self.versions[v] = self.versions.get(v, 0) + n
        return self

    @property
    def accuracy(self) -> float | None:
        return round(self.correct / self.ok, 4) if self.ok else None


class Stack:
    """One `driftloop serve` and one `driftloop controller` on one home; stopped on exit, whatever happens.

    Every request goes through `replay`, which keeps the acknowledged request ids (for `rows_lost`).
    """

    def __init__(self, home: Path, controller_sets: list[str], say: Say, *, feedback: float = 0.5, feedback_delay_s: float = 2.0):
        self.home, self.sets, self.say = home, controller_sets, say
        self.feedback, self.feedback_delay_s = feedback, feedback_delay_s
        self.service: Proc | None = None
        self.controller: Proc | None = None
        self.acked: list[str] = []
        self.env: dict = {}
        self.url = ""

    def __enter__(self) -> Self:
        from core import audit  # noqa: PLC0415
        from core.statedb import get_engine  # noqa: PLC0415
        from monitoring import store  # noqa: PLC0415
        use_home(self.home)
        self.env = {**os.environ, "DRIFTLOOP_SERVICE_RELOAD_INTERVAL_S": "1"}
        port, cport = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        try:
            self.service = Proc(["serve", "--port", str(port)], self.env, self.home / "service.log")
            self.service.wait_http(f"{self.url}/readyz")
            sets = [x for item in self.sets for x in ("--set", item)]
            self.controller = Proc(["controller", "--port", str(cport), *CONTROLLER_ARGS, *sets], self.env, self.home / "controller.log")
            self.controller.wait_http(f"http://127.0.0.1:{cport}/healthz")
        except BaseException:
            self.close()
            raise
        self.engine = get_engine()
        store.ensure_schema(self.engine)
        audit.ensure_schema(self.engine)
        self.say(f"service {self.url}, controller :{cport}; logs: {self.home}/service.log, controller.log, runs/")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for proc in (self.controller, self.service):
            if proc is not None:
                proc.stop()
        self.controller = self.service = None

    def replay(self, rows: Rows, *, feedback: float | None = None, concurrency: int = 8, seed: int = 0, **kw) -> ReplayStats:
        st = replay(self.url, rows, concurrency=concurrency, seed=seed,
                    feedback_fraction=self.feedback if feedback is None else feedback,
                    feedback_delay_s=kw.pop("feedback_delay_s", self.feedback_delay_s), **kw)
        self.acked.extend(st.request_ids)
        return st

    def serving(self) -> str:
        from core import alias  # noqa: PLC0415

        return alias.current(engine=self.engine).tag

    def wait_served(self, tag: str, row: tuple[str, str], tally: Tally, timeout_s: float = 60) -> bool:
        """Probe /predict until it answers with `tag` (every worker polls the alias each second)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            st = self.replay([row], feedback=0.0, concurrency=1)
            tally.add(st)
            if tag in st.versions:
                return True
            time.sleep(0.5)
        return False


class Background:
    """Low-rate traffic (cycling over `rows`, feedback as the phase's) in a thread, so a hot swap happens under load."""

    def __init__(self, stack: Stack, rows: Rows, rate: float, seed: int = 100):
        self.stack, self.rows, self.rate, self.seed = stack, rows, rate, seed
        self.tally = Tally()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self.rows and self.rate > 0:
            self._thread = threading.Thread(target=self._run, name="bench-background", daemon=True)
            self._thread.start()

    def stop(self) -> Tally:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.tally

    def _run(self) -> None:
        n, i = max(4, int(self.rate * 4)), 0  # chunks of ~4 s, each with its own late feedback
        while not self._stop.is_set():
            chunk = [self.rows[(i + k) % len(self.rows)] for k in range(n)]
            self.tally.add(self.stack.replay(chunk, rate=self.rate, concurrency=2, seed=self.seed + i, feedback_delay_s=0.5))
            i += n


# --- audit trail and monitor passes -------------------------------------------------------------------
@dataclass
class Mark:
    """Positions in the audit trail and the monitor-pass table: what happened after it is a phase's own."""

    event_id: int
    run_id: int

    @classmethod
    def now(cls, engine) -> Mark:
        from monitoring import store  # noqa: PLC0415

        last = _audit().history(engine, limit=1)
        return cls(last[0]["id"] if last else 0, (store.latest(engine) or {}).get("run_id") or 0)


def events_between(engine, start: Mark, end: Mark | None = None, kinds: tuple[str, ...] | None = None) -> list[dict]:
    """Audit events after `start` (up to `end`), oldest first."""
    rows = _audit().history(engine, limit=5000, kinds=kinds)
    return [e for e in rows[::-1] if e["id"] > start.event_id and (end is None or e["id"] <= end.event_id)]


def passes_between(engine, start: Mark, end: Mark | None = None) -> list[dict]:
    """Monitor passes after `start` (up to `end`), oldest first."""
    from monitoring import store  # noqa: PLC0415

    rows = store.recent(engine, limit=5000)
    return [r for r in rows[::-1] if r["run_id"] > start.run_id and (end is None or r["run_id"] <= end.run_id)]


def refine_running(engine) -> bool:
    """A refinement started and has recorded no outcome yet."""
    last = _audit().history(engine, limit=1, kinds=REFINE_KINDS)
    return bool(last) and last[0]["kind"] == "retrain_started"


def drift_counts(passes: list[dict]) -> dict:
    """Monitor passes, those with a drift verdict, and the distinct windows (last log id) they judged drifted."""
    drifted = [p for p in passes if p.get("status") == "ok" and p.get("drift")]
    return {"monitor_passes": len(passes), "drift_passes": len(drifted), "drift_windows": len({p.get("window_last_id") for p in drifted})}


def event_counts(events: list[dict]) -> dict:
    kinds = [e["kind"] for e in events]
    return {"retrains_started": kinds.count("retrain_started"), "promotions": kinds.count("promotion"), "rollbacks": kinds.count("rollback")}


def gate_summary(e: dict) -> dict:
    keys = ("passed", "reasons", "champion_fresh_accuracy", "challenger_fresh_accuracy", "fresh_n", "p_value", "regression_loss", "regression_n")
    return {"challenger": e.get("model_version"), **{k: e.get(k) for k in keys}}


def labelled_predictions(engine, tag: str) -> int:
    """Labelled predictions of `tag` with their text: what a manual refinement of it trains and gates on."""
    from core import predlog  # noqa: PLC0415

    return predlog.labelled_count(engine, tag, with_text=True)


def max_log_id(engine) -> int:
    from core import predlog  # noqa: PLC0415

    return predlog.max_id(engine)


def rows_lost(engine, acked: list[str]) -> int:
    """Acknowledged request ids missing from the prediction log (check after the service stopped: it flushes on exit)."""
    from core import predlog  # noqa: PLC0415

    return len(set(acked) - predlog.request_ids(engine))


# --- waiting for the loop -----------------------------------------------------------------------------

@dataclass
class Settled:
    outcome: str  # promoted | not_promoted | refine_failed | quiet | timeout
    promoted: str | None = None
    served: bool = False
    seconds: float = 0.0


def settle(stack: Stack, mark: Mark, background: Background, tally: Tally, *, settle_s: float, timeout_s: float) -> Settled:
    """Poll the audit trail until (a) a promotion after `mark` is served by the service, (b) a refinement after
    `mark` finished without one, or (c) no refinement ran or started for `settle_s` seconds. While a
    refinement runs, `background` sends low-rate traffic; its requests go to `tally`."""
    t0 = quiet_since = time.time()
    try:
        while time.time() - t0 < timeout_s:
            events = events_between(stack.engine, mark, kinds=(*REFINE_KINDS, "promotion"))
            running = refine_running(stack.engine)
            if running:
                background.start()
                quiet_since = time.time()
            promotions = [e for e in events if e["kind"] == "promotion"]
            if promotions:
                tag = promotions[-1]["model_version"]
                background.start()
                served = stack.wait_served(tag, background.rows[0], tally)
                time.sleep(3)  # a little more traffic on the new model
                return Settled("promoted", tag, served, round(time.time() - t0, 1))
            finished = [e for e in events if e["kind"] in REFINE_KINDS[1:]]
            if finished and not running:
                kind = "not_promoted" if finished[-1]["kind"] == "retrain_succeeded" else "refine_failed"
                return Settled(kind, seconds=round(time.time() - t0, 1))
            if not running and time.time() - quiet_since >= settle_s:
                return Settled("quiet", seconds=round(time.time() - t0, 1))
            time.sleep(2)
        return Settled("timeout", seconds=round(time.time() - t0, 1))
    finally:
        tally.add(background.stop())


def wait_idle(stack: Stack, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while refine_running(stack.engine) and time.time() < deadline:
        time.sleep(2)


# --- sequence mode ------------------------------------------------------------------------------------

PHASES = ("finance", "imdb", "yelp", "sst2", "retrain", "forget")


@dataclass
class SequenceOptions:
    phases: list[str]
    settle_s: float = 90
    timeout_s: float = 900
    swap_rate: float = 2.0
    retrain_min_labels: int = 200
    retrain_topup: int = 400
    rate: float = 40.0  # req/s: paced like live traffic, so 5-s passes see distinct windows (a burst is one window)


class Sequence:
    """One service and one controller through phases of traffic (see bench/loop.py)."""

    def __init__(self, stack: Stack, corpus: Corpus, models: Models, champion: str, opts: SequenceOptions, say: Say):
        self.stack, self.corpus, self.models, self.champion, self.opts, self.say = stack, corpus, models, champion, opts, say
        self.seen = [SOURCE]
        self.mark = Mark.now(stack.engine)
        self.records: list[dict] = []
        self.first_id: dict[str, int] = {}  # each traffic phase's first log id

    def run(self) -> list[dict]:
        self.traffic_phase("stable", self.corpus.stable, SOURCE)
        domain = SOURCE
        for i, name in enumerate(self.opts.phases):
            if name == "retrain":
                self.retrain_phase(domain, seed=10 + i)
            elif name == "forget":
                self.forget_phase(domain)
            else:
                domain = name
                if name not in self.seen:
                    self.seen.append(name)
                self.traffic_phase(name, self.corpus.traffic[name], name, seed=10 + i)
        return self.records

    def traffic_phase(self, name: str, rows: Rows, domain: str, seed: int = 1) -> None:
        before, t0, tally = self.stack.serving(), time.time(), Tally()
        self.first_id[name] = max_log_id(self.stack.engine) + 1
        self.say(f"[{name}] {len(rows)} requests of {domain}, serving {before}")
        tally.add(self.stack.replay(rows, seed=seed, rate=self.opts.rate))
        background = Background(self.stack, self.corpus.traffic[domain], self.opts.swap_rate, seed=seed * 1000)
        settled = settle(self.stack, self.mark, background, tally, settle_s=self.opts.settle_s, timeout_s=self.opts.timeout_s)
        self.close_phase(name, before, tally, settled, t0)

    def retrain_phase(self, domain: str, seed: int) -> None:
        """`driftloop retrain --json` on the current champion, after topping up its labelled traffic if it has too few."""
        wait_idle(self.stack, self.opts.timeout_s)
        before, t0, tally = self.stack.serving(), time.time(), Tally()
        labelled = labelled_predictions(self.stack.engine, before)
        pool = self.corpus.traffic[domain]
        if labelled < self.opts.retrain_min_labels:
            topup = random.Random(seed).choices(pool, k=self.opts.retrain_topup)
            self.say(f"[retrain] {before} has {labelled} labelled predictions: sending {len(topup)} more of {domain}")
            tally.add(self.stack.replay(topup, seed=seed))
        self.say(f"[retrain] forcing a refinement of {before} (driftloop retrain --json) ...")
        background = Background(self.stack, pool, self.opts.swap_rate, seed=seed * 1000)
        background.start()  # the refinement runs now: the swap, if any, happens under load
        started = Mark.now(self.stack.engine)  # the forced refinement's own events come after this
        out = subprocess.run([sys.executable, "-m", "driftloop", "retrain", "--json"], cwd=ROOT, env=self.stack.env,
                             capture_output=True, text=True, check=False)
        forced = _last_json(out.stdout) or {"error": out.stderr.strip()[-500:], "exit_code": out.returncode}
        settled = settle(self.stack, started, background, tally, settle_s=0, timeout_s=self.opts.timeout_s)
        challenger = forced.get("model_version") if forced.get("kind") == "retrain_succeeded" else None
        self.close_phase("retrain", before, tally, settled, t0, forced={k: forced.get(k) for k in (
            "kind", "model_version", "promoted", "gate_passed", "reasons", "seconds", "error", "exit_code")}, challenger=challenger)

    def forget_phase(self, domain: str) -> None:
        """A challenger built to forget: the champion refined on the newest domain's labelled traffic only
        (from that phase's first log id), no replay, no weight averaging, 3 epochs; gated, never promoted.
        The gate must refuse it (issue: per-domain non-inferiority)."""
        wait_idle(self.stack, self.opts.timeout_s)
        before, t0 = self.stack.serving(), time.time()
        since = self.first_id.get(domain)
        self.say(f"[forget] refining {before} on {domain} only (log ids from {since}), no replay, no averaging ...")
        out = subprocess.run([sys.executable, "-m", "driftloop", "refine", "--json", "--quiet", "--no-promote",
                              "--trigger", f"bench: built to forget (only {domain})", *(["--since-id", str(since)] if since else []),
                              "--set", "replay_ratio=0", "--set", "weight_averaging=false", "--set", "epochs=3"],
                             cwd=ROOT, env=self.stack.env, capture_output=True, text=True, check=False)
        summary = _last_json(out.stdout) or {"error": out.stderr.strip()[-800:], "exit_code": out.returncode}
        challenger = summary.get("challenger")
        gate = summary.get("gate") or {}
        rec = {"phase": "forget", "serving": self.stack.serving(), "before": before, "domain": domain, "challenger": challenger,
               "gate": {k: gate.get(k) for k in ("passed", "reasons", "notes", "parts", "fresh_n", "champion_fresh_accuracy",
                                                   "challenger_fresh_accuracy", "p_value", "regression_loss", "regression_n",
                                                   "regression_p_value")},
               "held_out_before": self.models.scores(before, self.seen),
               "challenger_held_out": self.models.scores(challenger, self.seen) if challenger else {},
               "error": summary.get("error"), "seconds": round(time.time() - t0, 1), "requests": 0, "failed_requests": 0}
        self.mark = Mark.now(self.stack.engine)  # its retrain_started and gate events are this phase's, not the next one's
        self.records.append(rec)
        self.say(json.dumps(rec))

    def close_phase(self, name: str, before: str, tally: Tally, settled: Settled, t0: float, **extra) -> None:
        engine = self.stack.engine
        end = Mark.now(engine)
        events = events_between(engine, self.mark, end)
        passes = passes_between(engine, self.mark, end)
        self.mark = end
        from core import audit  # noqa: PLC0415
        serving = self.stack.serving()
        rec = {
            "phase": name, "serving": serving, "generation": self.models.generation(serving), "before": before,
            "requests": tally.sent, "failed_requests": tally.errors, "traffic_accuracy": tally.accuracy, **event_counts(events),
            **drift_counts(passes), "last_policy_reason": (audit.last(engine, "policy") or {}).get("reason"),
            "gates": [gate_summary(e) for e in events if e["kind"] == "gate"], "settled": settled.outcome,
            "served_new_model": settled.served if settled.promoted else None, "seconds": round(time.time() - t0, 1),
            "held_out": self.models.scores(serving, self.seen), "held_out_before": self.models.scores(before, self.seen),
            "lineage": self.models.summary(serving), **extra,
        }
        challenger = extra.get("challenger")
        if challenger and challenger != serving:  # refused by the gate: its figures too
            rec["challenger_held_out"] = self.models.scores(challenger, self.seen)
            rec["challenger_lineage"] = self.models.summary(challenger)
        self.records.append(rec)
        self.say(json.dumps(rec))


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _check(name: str, ok: bool, detail: str) -> dict:
    return {"target": name, "pass": bool(ok), "detail": detail}


def sequence_targets(records: list[dict], champion: str) -> list[dict]:
    """The targets of the sequence mode, for the phases it ran."""
    by = {r["phase"]: r for r in records}
    out = []
    if "finance" in by:
        r = by["finance"]
        gain = r["held_out"]["finance"] - r["held_out_before"]["finance"]
        loss = r["held_out_before"][SOURCE] - r["held_out"][SOURCE]
        out += [_check("finance: promoted", r["promotions"] > 0 and r["serving"] != r["before"], f"{r['before']} → {r['serving']}"),
                _check("finance: held-out finance ≥ +20 points", gain >= 0.20, f"{gain * 100:+.1f} points"),
                _check("finance: SST-2 test loss ≤ 1 point", loss <= 0.01, f"{loss * 100:+.1f} points lost")]
    promoted = [r for r in records if r["phase"] != "forget" and r["serving"] != r["before"]]
    for r in promoted:  # every promoted generation against its parent, on every domain seen so far
        common = [d for d in r["held_out_before"] if d in r["held_out"]]
        worst = min((r["held_out"][d] - r["held_out_before"][d] for d in common), default=0.0)
        out.append(_check(f"{r['phase']}: the promoted generation loses ≤ 1 point on every seen domain", worst >= -0.01,
                          ", ".join(f"{d} {r['held_out_before'][d]:.3f} → {r['held_out'][d]:.3f}" for d in common)))
    for name in ("imdb", "yelp", "sst2"):
        if name in by:
            out.append(_check(f"{name}: 0 retrains started", by[name]["retrains_started"] == 0, str(by[name]["retrains_started"])))
    if "retrain" in by:
        out += _retrain_targets(by["retrain"], champion)
    if "forget" in by:
        r = by["forget"]
        gate = r.get("gate") or {}
        lost = {d: r["held_out_before"][d] - r["challenger_held_out"].get(d, float("nan")) for d in r["held_out_before"]}
        out.append(_check("forget: the gate refuses a challenger built to forget (newest domain only, no replay)",
                          r.get("challenger") is not None and gate.get("passed") is False,
                          f"held-out lost: {', '.join(f'{d} {v * 100:+.1f} pt' for d, v in lost.items())}; reasons: {gate.get('reasons')}"))
    failed = {r["phase"]: r["failed_requests"] for r in records}
    out.append(_check("0 failed requests in every phase", not any(failed.values()), json.dumps(failed)))
    return out


def _retrain_targets(r: dict, champion: str) -> list[dict]:
    """The generation-2 model: the serving one if the gate passed, else the refused challenger."""
    gen1 = r["before"]
    model = r.get("challenger") or r["serving"]
    promoted = model == r["serving"] and model != gen1
    held = r["held_out"] if promoted else r.get("challenger_held_out") or {}
    lineage = r["lineage"] if promoted else r.get("challenger_lineage") or {}
    before = r["held_out_before"]
    rbg = lineage.get("replay_by_generation") or {}
    gate = next((g for g in reversed(r["gates"]) if g["challenger"] == model), {})
    suite = gate.get("regression_n") or lineage.get("regression_suite_rows") or 0  # what it was gated on
    worst = min((held.get(d, 0) - before[d] for d in before), default=0)
    return [
        {"target": "retrain: generation-2 model promoted and served (not a target: the gate decides)", "pass": None,
         "detail": f"{model} (generation {lineage.get('generation')}), {r['settled']}, promoted: {promoted and bool(r.get('served_new_model'))}"},
        _check("retrain: replay rows from generation 0 and generation 1", gen1 != champion and rbg.get(champion, 0) > 0 and rbg.get(gen1, 0) > 0,
               f"replay_by_generation {rbg or 'not recorded'}; generation 1 = {gen1}"),
        _check("retrain: every seen domain within 1 point of generation 1", bool(held) and worst >= -0.01,
               ", ".join(f"{d} {before[d]:.3f} → {held.get(d, float('nan')):.3f}" for d in before)),
        _check("retrain: regression suite ≥ 300 items", suite >= 300,
               f"gated on {suite} items; its own suite (for its successor) {lineage.get('regression_suite_rows')} rows"),
    ]


def sequence_table(records: list[dict]) -> str:
    lines = [("| phase | serving (generation) | requests | failed | retrains | promotions | rollbacks | drift windows / passes "
              "| settled | held-out accuracy | last policy reason |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["phase"] == "forget":  # a challenger gated, never served
            held = ", ".join(f"{d} {r['held_out_before'][d]:.3f} → {a:.3f}" for d, a in r["challenger_held_out"].items())
            gate = r.get("gate") or {}
            verdict = "refused" if gate.get("passed") is False else "PASSED" if gate.get("passed") else f"no gate ({r.get('error')})"
            lines.append(f"| forget ({r['domain']} only, no replay) | {r['serving']} | 0 | 0 | 1 (by hand) | 0 | 0 | | gate {verdict} "
                         f"| challenger: {held} | {'; '.join(gate.get('reasons') or [])[:300]} |")
            continue
        held = ", ".join(f"{d} {a:.3f}" for d, a in r["held_out"].items())
        reason = (r["last_policy_reason"] or "")[:80]
        lines.append(f"| {r['phase']} | {r['serving']} ({r['generation']}) | {r['requests']} | {r['failed_requests']} | {r['retrains_started']} "
                     f"| {r['promotions']} | {r['rollbacks']} | {r['drift_windows']} / {r['monitor_passes']} | {r['settled']} | {held} | {reason} |")
    return "\n".join(lines)


def run_sequence(home: Path, corpus: Corpus, opts: SequenceOptions, controller_sets: list[str], say: Say, *,
                 feedback: float, feedback_delay_s: float) -> dict:
    champion = train_champion(home, corpus.train, say)
    models = Models(corpus.held)
    with Stack(home, controller_sets, say, feedback=feedback, feedback_delay_s=feedback_delay_s) as stack:
        records = Sequence(stack, corpus, models, champion, opts, say).run()
    return {"mode": "sequence", "home": str(home), "champion": champion, "phases": records,
            "rows_lost": rows_lost(stack.engine, stack.acked), "targets": sequence_targets(records, champion)}


# --- simulated day ----------------------------------------------------------------------------------

STABLE_DEFINITION = ("stable hours: template hours 0-5 (SST-2 only, the champion's training domain) and 18-23 (80 % SST-2 + "
                     "20 % finance) when the model serving at the hour's start is a refinement (generation ≥ 1, i.e. it has "
                     "adapted to finance); false alarms: drifted monitor windows (distinct window_last_id, attributed to the "
                     "hour of the window's last prediction) and retrains started in those hours, per 10,000 of their requests")


def template_hour(hour: int, hours: int) -> float:
    """Where the middle of `hour` (out of `hours`) falls on the 24-hour template (4 hours: 3, 9, 15, 21)."""
    return (hour + 0.5) * 24 / hours


def hour_mix(hour: int, hours: int) -> dict[str, float]:
    """The domain mix of `hour` out of `hours`, on the 24-hour template."""
    t = template_hour(hour, hours)
    if t < 6:
        return {SOURCE: 1.0}
    if t < 10:  # ramp: 25 → 100 % finance
        f = min(1.0, 0.25 * (int(t - 6) + 1))
        return {k: v for k, v in {SOURCE: 1 - f, "finance": f}.items() if v > 0}
    if t < 14:
        return {"finance": 1.0}
    if t < 18:
        return {"imdb": 0.5, "yelp": 0.5}
    return {SOURCE: 0.8, "finance": 0.2}


def is_stable_hour(hour: int, hours: int, generation: int) -> bool:
    t = template_hour(hour, hours)
    return t < 6 or (t >= 18 and generation >= 1)


@dataclass
class SimulateOptions:
    hours: int = 24
    requests: int = 20_000
    chunk: int = 250
    rate: float | None = None
    timeout_s: float = 900
    seed: int = 0


def _sample(corpus: Corpus, mix: dict[str, float], n: int, rng: random.Random) -> Rows:
    domains = rng.choices(list(mix), weights=list(mix.values()), k=n)
    return [rng.choice(corpus.traffic[d]) for d in domains]


def _hour_record(models: Models, hour: int, mix: dict, tally: Tally, serving: str, events: list[dict], passes: list[dict],
                 stable: bool) -> dict:
    return {"hour": hour, "mix": {d: round(w, 2) for d, w in mix.items()}, "requests": tally.sent, "failed_requests": tally.errors,
            "traffic_accuracy": tally.accuracy, "serving_at_start": serving, "generation": models.generation(serving),
            "answered_by": tally.versions, "stable": stable, **event_counts(events), **drift_counts(passes)}


def run_simulation(home: Path, corpus: Corpus, opts: SimulateOptions, controller_sets: list[str], say: Say, *,
                   feedback: float, feedback_delay_s: float) -> dict:
    champion = train_champion(home, corpus.train, say)
    models = Models(corpus.held)
    rng = random.Random(opts.seed)
    per_hour = [opts.requests // opts.hours + (h < opts.requests % opts.hours) for h in range(opts.hours)]
    hours, first_ids = [], []  # first_ids[h]: the first prediction-log id of hour h, to attribute monitor windows
    with Stack(home, controller_sets, say, feedback=feedback, feedback_delay_s=feedback_delay_s) as stack:
        engine = stack.engine
        for hour in range(opts.hours):
            mix, serving, mark = hour_mix(hour, opts.hours), stack.serving(), Mark.now(engine)
            first_ids.append(max_log_id(engine) + 1)
            tally = Tally()
            rows = _sample(corpus, mix, per_hour[hour], rng)
            for s in range(0, len(rows), opts.chunk):
                tally.add(stack.replay(rows[s:s + opts.chunk], rate=opts.rate, seed=hour * 1000 + s))
            hours.append((hour, mix, tally, serving, mark))
            mix_text = " + ".join(f"{d} {w:.0%}" for d, w in mix.items())
            say(f"[hour {hour}] {mix_text}: {tally.sent} requests, {tally.errors} failed, serving {serving}, traffic accuracy {tally.accuracy}")
        wait_idle(stack, opts.timeout_s)  # a refinement started in the last hour ends before the stack stops
        time.sleep(12)  # the last windows' monitor passes
        end = Mark.now(engine)
    passes_by_hour: dict[int, list[dict]] = {}
    for p in passes_between(engine, hours[0][4], end):  # a window belongs to the hour of its last prediction
        passes_by_hour.setdefault(max(0, bisect.bisect_right(first_ids, p.get("window_last_id") or 0) - 1), []).append(p)
    records = []
    for i, (hour, mix, tally, serving, mark) in enumerate(hours):
        passes = passes_by_hour.get(hour, [])
        events = events_between(engine, mark, hours[i + 1][4] if i + 1 < len(hours) else end)
        records.append(_hour_record(models, hour, mix, tally, serving, events, passes,
                                    is_stable_hour(hour, opts.hours, models.generation(serving))))
    final = _final_serving(engine)
    return {"mode": "simulate", "home": str(home), "champion": champion, "serving_at_end": final,
            **_simulation_totals(records, rows_lost(engine, stack.acked)), "hours": records,
            "held_out": {"champion": models.scores(champion, list(corpus.held)), "serving_at_end": models.scores(final, list(corpus.held))}}


def _final_serving(engine) -> str:
    from core import alias  # noqa: PLC0415

    return alias.current(engine=engine).tag


def _simulation_totals(records: list[dict], lost: int) -> dict:
    stable = [r for r in records if r["stable"]]
    n_stable = sum(r["requests"] for r in stable)
    per_10k = (lambda k: round(sum(r[k] for r in stable) * 10_000 / n_stable, 2) if n_stable else None)
    total = (lambda k: sum(r[k] for r in records))
    return {
        "requests": total("requests"), "failed_requests": total("failed_requests"), "rows_lost": lost,
        "retrains_started": total("retrains_started"), "promotions": total("promotions"), "rollbacks": total("rollbacks"),
        "stable_requests": n_stable, "stable_hours": [r["hour"] for r in stable],
        "false_alarms_per_10k_stable": {"drift_windows": per_10k("drift_windows"), "retrains_started": per_10k("retrains_started")},
        "false_alarm_definition": STABLE_DEFINITION,
    }


def simulation_table(summary: dict) -> str:
    lines = ["| hour | mix | requests | failed | serving at start (gen) | drift windows / passes | retrains | promotions | rollbacks | stable |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["hours"]:
        mix = " + ".join(f"{d} {w:.0%}" for d, w in r["mix"].items())
        lines.append(f"| {r['hour']} | {mix} | {r['requests']} | {r['failed_requests']} | {r['serving_at_start']} ({r['generation']}) "
                     f"| {r['drift_windows']} / {r['monitor_passes']} | {r['retrains_started']} | {r['promotions']} | {r['rollbacks']} "
                     f"| {'yes' if r['stable'] else ''} |")
    return "\n".join(lines)



def _audit():
    """The audit trail module, imported once the bench has pointed DRIFTLOOP_HOME at its home."""
    from core import audit  # noqa: PLC0415

    return audit
