"""Label requests: the closed loop where labels are scarce (no or little organic feedback), answered
by a simulated annotator in a real Label Studio.

The shift is the one of bench/loop.py's finance scenario: a champion fine-tuned on SST-2 train rows
(3000 rows, 1 epoch) serves stable SST-2 traffic, then financial news. Four measurements:

1. scarce (--parts scarce): 0 % organic feedback. The service, the controller (with
   `--set labels.studio_url=... labels.sync_interval_s=...`, as `driftloop up` starts it) and Label
   Studio (driftloop/labelstudio.py) run on loopback; a simulated annotator (a thread) polls Label
   Studio for unannotated tasks of the run's project (GET /api/projects, /api/projects/{id}/tasks)
   and answers each with its true label (the bench sent the texts, so it knows them) through
   POST /api/tasks/{id}/annotations/, --annotator-delay seconds after the task appeared and
   --per-task seconds per task (one annotator, one task at a time). Finance traffic is paced at
   --rate requests/s from the onset until the champion is replaced (or --timeout). Reported from
   the onset to the promotion: requests sent, labels asked for (by kind and purpose), labels
   answered, minutes. Targets: promoted, ≤ 300 labels asked, ≤ 15 minutes.
2. efficiency (--parts efficiency; offline, no service): the champion's real outputs on the finance
   traffic rows are written to a prediction log (core/predlog.write_batch), then for each seed and
   budget B a training batch is labelled through the product's path (labels/requests.py +
   labels/answers.py, so provenance is right) and ONE refinement runs (loop/refine.run, the default
   RefineConfig but for promote=false, a gate minimum small enough for B=50, serving runtime torch):
   informative+random (round(B·random_share) uniform at random, the rest labels/select.py
   informative_batch, as loop/ask.py splits a training batch) against random only, paired by seed
   (the same seed draws the random part and seeds the refinement). Held-out finance accuracy (rows
   never sent). Target: informative+random at 100 ≥ random at 200 (mean over seeds).
3. unbiasedness (computed from the runs of 1. and 4. that ask for labels): for every distinct
   monitor window of the champion holding ≥ --min-window-random requested-random labels, is the
   count of correct predictions among them inside the central 95 % binomial interval given the
   window's true accuracy (the truth of ALL its rows, known to the bench)? Target: ≥ 95 % of windows.
   The informative stratum on the same windows is shown for contrast.
4. organic (--parts organic): organic feedback at each --organic share, with label requests (as 1.)
   and without (labels.enabled=false): time to promotion, capped at --organic-timeout.

    python bench/labels.py                                  # everything (~60-90 min on 2 cores)
    python bench/labels.py --parts scarce --json
    python bench/labels.py --parts efficiency --seeds 2
    python bench/labels.py --parts organic --organic 0.05 --organic-timeout 600

Everything lives under the bench home printed at the start ($DRIFTLOOP_HOME if set, else a new
temporary directory): champion/ (reused when it holds a champion.txt), run-*/ (service.log,
controller.log, runs/refine-*.log of each live run), studio/ (Label Studio's data and log),
efficiency/, bentoml/ (one model store shared by every run) and summary.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ (the script's own directory, where loop_phases is)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
BASE_HOME = Path(os.environ.get("DRIFTLOOP_HOME") or tempfile.mkdtemp(prefix="driftloop-bench-labels-"))
os.environ["DRIFTLOOP_HOME"] = str(BASE_HOME / "champion")
# one model store for every run: BentoML reads BENTOML_HOME once per process, and the bench process
# loads models registered by each run's refinement; every run keeps its own state DB (alias, log, audit)
os.environ["BENTOML_HOME"] = str(BASE_HOME / "bentoml")
os.environ.pop("DRIFTLOOP_DB_URL", None)

import httpx  # noqa: E402
import loop_phases as lp  # noqa: E402  (bench/loop_phases.py)

from driftloop.procs import Proc, free_port  # noqa: E402

SHIFT = "finance"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- the champion and the shared Label Studio ----------------------------------------------------

def champion_of(home: Path, corpus: lp.Corpus) -> str:
    marker = home / "champion.txt"
    if marker.exists():
        tag = marker.read_text().strip()
        say(f"champion {tag} reused from {home}")
        return tag
    if home.exists():
        shutil.rmtree(home)
    tag = lp.train_champion(home, corpus.train, say)
    marker.write_text(tag + "\n")
    return tag


def ensure_tokens(home: Path) -> None:
    """Every token a run needs, made once in the champion's home, so every run (a copy of it) and the
    one Label Studio share them."""
    from core import tokens  # noqa: PLC0415

    lp.use_home(home)
    for kind in ("feedback", "admin", "labelstudio", "labels"):
        tokens.ensure(kind)


def start_studio(champion_home: Path) -> tuple[Proc, str]:
    """One Label Studio for every run (its first boot migrates its database: about a minute); each
    run has its own project prefix (labels.studio_project)."""
    from driftloop import labelstudio  # noqa: PLC0415

    lp.use_home(champion_home)  # its token and password: the champion's, copied into every run
    studio_home = BASE_HOME / "studio"
    studio_home.mkdir(exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = Proc([], labelstudio.environment(studio_home), studio_home / "labelstudio.log", cmd=labelstudio.command(studio_home, port))
    proc.wait_http(f"{url}/health", timeout=600)
    say(f"Label Studio {url} up in {time.perf_counter() - t0:.0f}s (log {studio_home / 'labelstudio.log'})")
    return proc, url


# --- the simulated annotator -----------------------------------------------------------------------

class Annotator(threading.Thread):
    """One person answering the run's Label Studio tasks with the true labels, in the order the
    project's queue shows them (labels/studio.py: uncertainty sampling, least sure first; the
    model's score is read from the prediction log by request id): a task may be answered
    `delay_s` after it first appeared (polled every `poll_s`), each answer takes `per_task_s`,
    one at a time."""

    def __init__(self, url: str, token: str, prefix: str, truth: dict[str, str], score, delay_s: float, per_task_s: float,
                 poll_s: float = 2.0):
        super().__init__(name="annotator", daemon=True)
        self.url, self.prefix, self.truth, self.score = url.rstrip("/"), prefix, truth, score
        self.delay_s, self.per_task_s, self.poll_s = delay_s, per_task_s, poll_s
        self.client = httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Token {token}"})
        self.stop_event = threading.Event()
        self.queue: dict[int, dict] = {}  # task id -> task, unanswered
        self.seen: dict[int, float] = {}  # task id -> when first seen unannotated
        self.done: dict[int, float] = {}  # task id -> when answered
        self.unknown: list[int] = []  # tasks whose text the bench did not send (never expected)
        self.errors: list[str] = []

    def projects(self) -> list[int]:
        listed = self.client.get("/api/projects", params={"page_size": 1000}).json()
        listed = listed.get("results", listed) if isinstance(listed, dict) else listed
        return [p["id"] for p in listed if str(p.get("title", "")).startswith(self.prefix + ":")]

    def tasks(self, project: int) -> list[dict]:
        out, page = [], 1
        while True:
            r = self.client.get(f"/api/projects/{project}/tasks", params={"page_size": 500, "page": page})
            if r.status_code == 404:
                break
            r.raise_for_status()
            got = r.json()
            got = got.get("tasks", got) if isinstance(got, dict) else got
            out += got
            if len(got) < 500:
                break
            page += 1
        return out

    def refresh(self) -> None:
        now = time.time()
        for project in self.projects():
            for task in self.tasks(project):
                tid = task["id"]
                if tid in self.done or tid in self.queue:
                    continue
                if task.get("total_annotations") or task.get("is_labeled"):
                    self.done[tid] = now
                    continue
                self.seen[tid] = now
                self.queue[tid] = task

    def answer(self, task: dict) -> None:
        label = self.truth.get((task.get("data") or {}).get("text"))
        if label is None:
            self.unknown.append(task["id"])
        else:
            body = {"result": [{"from_name": "label", "to_name": "text", "type": "choices", "value": {"choices": [label]}}],
                    "was_cancelled": False, "lead_time": self.per_task_s}
            self.client.post(f"/api/tasks/{task['id']}/annotations/", json=body).raise_for_status()
        self.done[task["id"]] = time.time()
        self.queue.pop(task["id"], None)

    def run(self) -> None:
        last_refresh = 0.0
        while not self.stop_event.is_set():
            try:
                if time.time() - last_refresh >= self.poll_s:
                    self.refresh()
                    last_refresh = time.time()
                now = time.time()
                ready = [t for tid, t in self.queue.items() if self.seen[tid] + self.delay_s <= now]
                if not ready:
                    self.stop_event.wait(self.poll_s)
                    continue
                task = min(ready, key=lambda t: (self.score((t.get("data") or {}).get("request_id")), t["id"]))
                self.stop_event.wait(self.per_task_s)
                if not self.stop_event.is_set():
                    self.answer(task)
            except (httpx.HTTPError, ValueError, KeyError) as err:
                self.errors.append(f"{type(err).__name__}: {err}"[:300])
                self.stop_event.wait(self.poll_s)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(timeout=60)
        self.client.close()


def confidence_reader(engine):
    """request id -> the served (calibrated) confidence, from the prediction log: the task's score in Label Studio."""
    from sqlalchemy import select  # noqa: PLC0415

    from core import predlog  # noqa: PLC0415

    cache: dict[str, float] = {}

    def score(request_id: str | None) -> float:
        if request_id not in cache:
            with engine.connect() as conn:
                value = conn.execute(select(predlog.predictions.c.confidence).where(predlog.predictions.c.request_id == request_id)).scalar()
            cache[request_id] = float(value) if value is not None else 1.0
        return cache[request_id]
    return score


# --- live runs (1. and 4.) -------------------------------------------------------------------------

def truth_map(corpus: lp.Corpus) -> dict[str, str]:
    """text -> true label of every row the bench may send (a text with two labels is left out)."""
    out: dict[str, str] = {}
    bad: set[str] = set()
    for text, label in corpus.stable + corpus.traffic[SHIFT]:
        if out.get(text, label) != label:
            bad.add(text)
        out[text] = label
    for text in bad:
        out.pop(text)
    return out


def counts(engine, until: dt.datetime | None = None) -> dict:
    """Label requests created (by kind/purpose) and answered, up to `until`."""
    from sqlalchemy import func, select  # noqa: PLC0415

    from labels import requests  # noqa: PLC0415

    requests.ensure_schema(engine)
    c = requests.requests.c
    q = select(c.kind, c.purpose, c.status, c.answered_at, func.count()).group_by(c.kind, c.purpose, c.status, c.answered_at)
    if until is not None:
        q = q.where(c.created_at <= until)
    asked: dict[str, int] = {}
    answered, total = 0, 0
    with engine.connect() as conn:
        for kind, purpose, status, answered_at, n in conn.execute(q):
            key = f"{purpose}/{kind}"
            asked[key] = asked.get(key, 0) + n
            total += n
            if status == "answered" and (until is None or (answered_at is not None and _utc(answered_at) <= until)):
                answered += n
    return {"asked": total, "answered": answered, "asked_by": asked}


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def requests_between(engine, first_id: int, until: dt.datetime | None) -> int:
    from sqlalchemy import func, select  # noqa: PLC0415

    from core import predlog  # noqa: PLC0415

    c = predlog.predictions.c
    q = select(func.count()).select_from(predlog.predictions).where(c.id >= first_id)
    if until is not None:
        q = q.where(c.created_at <= until)
    with engine.connect() as conn:
        return int(conn.execute(q).scalar_one())


def live_run(name: str, corpus: lp.Corpus, champion: str, truth: dict[str, str], args, *, feedback: float, ask: bool,
             studio_url: str | None, timeout_s: float) -> dict:
    """One service + controller (+ annotator when `ask`) on a copy of the champion's home: stable SST-2
    traffic, then finance paced at --rate until the champion is replaced or `timeout_s` after the onset."""
    from core import alias, audit, tokens  # noqa: PLC0415
    from core import predlog as pl  # noqa: PLC0415

    home = BASE_HOME / f"run-{name}"
    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(BASE_HOME / "champion", home, symlinks=True, ignore=shutil.ignore_patterns("runs", "train.tsv"))
    prefix = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    sets = [f"labels.enabled={'true' if ask else 'false'}"]
    if ask:
        sets += [f"labels.studio_url={studio_url}", f"labels.sync_interval_s={args.sync_interval:g}", f"labels.studio_project={prefix}"]
    sets += args.sets
    say(f"[{name}] organic feedback {feedback:.0%}, label requests {'on' if ask else 'off'}; controller --set {' '.join(sets)}")
    annotator = None
    result: dict = {"run": name, "organic_feedback": feedback, "label_requests": ask, "home": str(home), "sets": sets}
    with lp.Stack(home, sets, say, feedback=feedback, feedback_delay_s=2.0) as stack:
        engine = stack.engine
        st = stack.replay(corpus.stable, seed=1)
        time.sleep(12)  # the controller passes over the last stable window
        onset_id = pl.max_id(engine) + 1
        if ask:
            annotator = Annotator(studio_url, tokens.get("labelstudio"), prefix, truth, confidence_reader(engine), args.annotator_delay,
                                  args.per_task)
            annotator.start()
        background = lp.Background(stack, corpus.traffic[SHIFT], args.rate, seed=2)
        t0 = time.time()
        onset_at = dt.datetime.now(dt.timezone.utc)
        say(f"[{name}] onset: finance at {args.rate:g} req/s (log id {onset_id}); stable: {st.sent} requests, {st.errors} failed")
        background.start()
        promoted, promoted_at, last_note = None, None, 0.0
        try:
            while time.time() - t0 < timeout_s:
                state = alias.current(engine=engine)
                if state is not None and state.tag != champion:
                    promoted = state.tag
                    event = next(iter(audit.history(engine, limit=1, kinds=("promotion",))), None)
                    promoted_at = dt.datetime.fromisoformat(event["at"]) if event else dt.datetime.now(dt.timezone.utc)
                    break
                if time.time() - last_note >= 30:
                    last_note = time.time()
                    c = counts(engine)
                    reason = (audit.last(engine, "policy") or {}).get("reason") or ""
                    say(f"[{name}] +{(time.time() - t0) / 60:.1f} min: {requests_between(engine, onset_id, None)} requests, "
                        f"labels asked {c['asked']} {c['asked_by']}, answered {c['answered']}; policy: {reason[:150]}")
                time.sleep(2)
        finally:
            tally = background.stop()
            if annotator is not None:
                annotator.stop()
        end_at = promoted_at or dt.datetime.now(dt.timezone.utc)
        minutes = round((end_at - onset_at).total_seconds() / 60, 2)
        c = counts(engine, end_at)
        gates = [lp.gate_summary(e) for e in audit.history(engine, limit=20, kinds=("gate",))][::-1]
        refines = audit.history(engine, limit=20, kinds=lp.REFINE_KINDS)[::-1]
        result.update({
            "promoted": promoted, "minutes_onset_to_promotion": minutes if promoted else None, "minutes_observed": minutes,
            "requests_onset_to_end": requests_between(engine, onset_id, end_at), **c,
            "failed_requests": st.errors + tally.errors, "gates": gates,
            "refinements": [{k: e.get(k) for k in ("kind", "at", "fresh_train", "gate", "replay", "promoted", "seconds", "error")}
                            for e in refines],
            "last_policy": (audit.last(engine, "policy") or {}).get("reason"),
            "onset_id": onset_id, "champion": champion,
        })
        result["timeline_min"] = timeline(engine, champion, onset_id, onset_at, end_at)
        result["random_batches"] = random_batches(engine) if ask else None
        if annotator is not None:
            result["annotator"] = {"answered": len(annotator.done) - len(annotator.unknown), "unknown_texts": len(annotator.unknown),
                                   "errors": annotator.errors[:5]}
    result["windows"] = window_check(engine, champion, truth, args.min_window_random) if ask else None
    models = lp.Models(corpus.held)
    if promoted:
        result["held_out"] = {"finance": [models.accuracy(champion, SHIFT), models.accuracy(promoted, SHIFT)],
                              "sst2": [models.accuracy(champion, lp.SOURCE), models.accuracy(promoted, lp.SOURCE)]}
    say(f"[{name}] " + json.dumps({k: v for k, v in result.items() if k != "windows"}, default=str))
    return result


def timeline(engine, champion: str, onset_id: int, onset_at: dt.datetime, end_at: dt.datetime) -> dict:
    """Minutes from the onset to each step of the loop (None: did not happen before the end)."""
    from sqlalchemy import func, select  # noqa: PLC0415

    from core import audit  # noqa: PLC0415
    from labels import requests  # noqa: PLC0415
    from monitoring import store  # noqa: PLC0415

    def minutes(at) -> float | None:
        if at is None:
            return None
        at = _utc(dt.datetime.fromisoformat(at) if isinstance(at, str) else at)
        # a minute's grace: the refinement records its success just after the promotion that ends the run
        return round((at - onset_at).total_seconds() / 60, 2) if at <= end_at + dt.timedelta(minutes=1) else None

    drifted = [r for r in store.recent(engine, limit=10_000, model_version=champion)
               if r.get("status") == "ok" and r.get("drift") and (r.get("window_last_id") or 0) >= onset_id]
    c = requests.requests.c
    with engine.connect() as conn:
        first_asked, last_answered = conn.execute(select(func.min(c.created_at), func.max(c.answered_at))).one()
    events = {k: audit.history(engine, limit=50, kinds=(k,)) for k in ("retrain_started", "retrain_succeeded", "promotion")}
    return {"first_drift_verdict": minutes(min((r["finished_at"] for r in drifted), default=None)),
            "first_labels_asked": minutes(first_asked), "last_label_answered": minutes(last_answered),
            **{k: min((m for m in (minutes(e["at"]) for e in v) if m is not None and m >= 0), default=None) for k, v in events.items()}}


def random_batches(engine, k: int = 50) -> list[dict]:
    """Each batch of random requests: accuracy of the served labels on its first `k` answers (in the order
    they came, i.e. the annotation queue's) against on all its answers, and the mean served confidence
    of both: whether a partly answered random sample is still a random sample."""
    from sqlalchemy import select  # noqa: PLC0415

    from core import predlog  # noqa: PLC0415
    from labels import requests  # noqa: PLC0415

    c, p = requests.requests.c, predlog.predictions.c
    q = (select(c.batch, c.purpose, c.answered_at, p.label, p.feedback_label, p.confidence)
         .join(predlog.predictions, p.id == c.log_id).where(c.kind == "random", c.status == "answered").order_by(c.answered_at))
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    out = []
    for batch in dict.fromkeys(r.batch for r in rows):
        mine = [r for r in rows if r.batch == batch]
        first = mine[:k]
        out.append({"purpose": mine[0].purpose, "answered": len(mine),
                    "accuracy_first": round(sum(r.label == r.feedback_label for r in first) / len(first), 4), "first": len(first),
                    "accuracy_all": round(sum(r.label == r.feedback_label for r in mine) / len(mine), 4),
                    "confidence_first": round(sum(r.confidence for r in first) / len(first), 4),
                    "confidence_all": round(sum(r.confidence for r in mine) / len(mine), 4)})
    return out


# --- 3. unbiasedness ----------------------------------------------------------------------------------

def window_check(engine, champion: str, truth: dict[str, str], min_random: int) -> dict:
    """Per distinct monitor window of the champion: the random stratum's correct count against the
    central 95 % binomial interval at the window's true accuracy (all its rows, from the truth)."""
    from scipy.stats import binom  # noqa: PLC0415
    from sqlalchemy import select  # noqa: PLC0415

    from core import predlog  # noqa: PLC0415
    from monitoring import store  # noqa: PLC0415

    c = predlog.predictions.c
    with engine.connect() as conn:
        rows = conn.execute(select(c.id, predlog.TEXT.label("text"), c.label, c.feedback_label, c.feedback_source)
                            .select_from(predlog.LOGGED).where(c.model_version == champion).order_by(c.id)).all()
    windows = sorted({(r["window_first_id"], r["window_last_id"]) for r in store.recent(engine, limit=10_000, model_version=champion)
                      if r.get("status") == "ok" and r.get("window_first_id") is not None})
    out = []
    for first, last in windows:
        inside = [r for r in rows if first <= r.id <= last and r.text in truth]
        if not inside:
            continue
        p_true = sum(r.label == truth[r.text] for r in inside) / len(inside)
        strata = {}
        for source in (predlog.REQUESTED_RANDOM, predlog.REQUESTED_INFORMATIVE):
            labelled = [r for r in inside if r.feedback_source == source and r.feedback_label is not None]
            n = len(labelled)
            if n < min_random:
                continue
            k = sum(r.label == r.feedback_label for r in labelled)
            lo, hi = binom.ppf(0.025, n, p_true), binom.ppf(0.975, n, p_true)
            strata[source] = {"n": n, "realized": round(k / n, 4), "interval": [round(lo / n, 4), round(hi / n, 4)],
                              "inside": bool(lo <= k <= hi)}
        if predlog.REQUESTED_RANDOM in strata:
            out.append({"window": [first, last], "rows": len(inside), "true_accuracy": round(p_true, 4), **strata})
    return {"windows": out, "checked": len(out), "inside": sum(w[predlog.REQUESTED_RANDOM]["inside"] for w in out)}


# --- 2. label efficiency (offline) ---------------------------------------------------------------------

def _log_champion_outputs(engine, champion: str, rows: list[tuple[str, str]]) -> tuple[int, int, dict[str, str]]:
    """The champion's real outputs on `rows`, written to the log as the service writes them;
    returns (first log id, last log id, request id -> true label)."""
    from core import predlog  # noqa: PLC0415
    from core.inference import load_predictor  # noqa: PLC0415

    p = load_predictor(champion, device="cpu")
    first = predlog.max_id(engine) + 1
    truth: dict[str, str] = {}
    for s in range(0, len(rows), 64):
        chunk = rows[s:s + 64]
        out = p.predict([t for t, _ in chunk])
        logged = []
        for i, (text, label) in enumerate(chunk):
            probs = {n: float(out.probs[i, j]) for j, n in enumerate(p.label_names)}
            rid = uuid.uuid4().hex
            truth[rid] = label
            logged.append(predlog.LoggedPrediction(rid, text, p.label_names[int(out.probs[i].argmax())], float(out.probs[i].max()), probs,
                                                   out.descriptors[i], out.truncated[i], out.embeddings[i]))
        predlog.write_batch(engine, champion, logged)
    return first, predlog.max_id(engine), truth


def _efficiency_trial(engine, champion: str, first: int, last: int, truth: dict[str, str], held: list[tuple[str, str]],
                      seed: int, budget: int, strategy: str, args) -> dict:
    """One training batch of `budget` labels (`strategy`), answered with the truth through the
    product's path, then ONE refinement, scored on the held-out rows."""
    from labels import answers, requests, select  # noqa: PLC0415
    from labels.config import LabelsConfig  # noqa: PLC0415
    from loop import refine  # noqa: PLC0415
    from loop.gate import GateConfig  # noqa: PLC0415
    from loop.refine_config import RefineConfig  # noqa: PLC0415

    config = LabelsConfig(per_day=100_000, per_refinement=100_000, confirm_max=200)
    t1 = time.perf_counter()
    n_random = budget if strategy == "random" else round(budget * args.random_share)
    randoms = select.random_sample(engine, champion, first, last, n_random, seed=f"efficiency:{seed}")
    made = requests.create(engine, randoms, model_version=champion, kind="random", purpose="training", reason="bench", config=config)
    informative = []
    if strategy != "random":
        informative = select.informative_batch(engine, champion, first, budget - len(randoms), pool_rows=5000,
                                               exclude={c.request_id for c in randoms}, seed=seed)
        requests.create(engine, informative, model_version=champion, kind="informative", purpose="training", reason="bench",
                        config=config, batch=made.batch)
    applied = answers.apply(engine, [answers.Answer(c.request_id, truth[c.request_id], annotator="bench") for c in randoms + informative])
    # defaults but for: no promotion, a gate that lets B=50 run, the gate scored with torch, and the
    # challenger's reference profile on 200 texts (min_reference_rows): none of these changes its weights
    cfg = RefineConfig(seed=seed, promote=False, min_fresh_labels=10, gate=GateConfig(min_gate_items=3), serving_runtime="torch",
                       reference_rows=200)
    summary = refine.run(engine, cfg, trigger=f"bench efficiency seed {seed} budget {budget} {strategy}", since_id=first)
    correct = held_out_correct(summary["challenger"], held)
    trial = {"seed": seed, "budget": budget, "strategy": strategy, "random": len(randoms), "informative": len(informative),
             "recorded": applied.recorded,
             "champion_wrong_in_informative": sum(truth[c.request_id] != _label_of(engine, c.request_id) for c in informative),
             "fresh_by_source": summary["refinement"]["fresh_by_source"], "gate_items": summary["refinement"]["gate_items"],
             "fresh_train": summary["refinement"]["fresh_train"], "finance_held_out": round(sum(correct) / len(correct), 4),
             "challenger": summary["challenger"], "seconds": round(time.perf_counter() - t1, 1)}
    say(f"[efficiency] {json.dumps(trial)}")
    trial["held_out_correct"] = "".join("1" if ok else "0" for ok in correct)  # per held-out item, for the paired tests
    return trial


def efficiency(corpus: lp.Corpus, champion: str, args) -> dict:
    """Part 2: every seed x budget x strategy from the same pristine log (the champion's outputs on the
    finance traffic), so trials differ only in which labels they were given."""
    from core import predlog  # noqa: PLC0415
    from core.statedb import dispose_engines, get_engine  # noqa: PLC0415
    from driftloop.demo import held_out_accuracy  # noqa: PLC0415

    home = BASE_HOME / "efficiency"
    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(BASE_HOME / "champion", home, symlinks=True, ignore=shutil.ignore_patterns("runs", "train.tsv"))
    lp.use_home(home)
    engine = get_engine()
    predlog.ensure_schema(engine)
    t0 = time.perf_counter()
    first, last, truth = _log_champion_outputs(engine, champion, corpus.traffic[SHIFT])
    traffic_acc = sum(truth[r.request_id] == r.label for r in _logged(engine, first)) / (last - first + 1)
    say(f"[efficiency] logged the champion's outputs on {last - first + 1} finance traffic rows in {time.perf_counter() - t0:.0f}s "
        f"(its accuracy there {traffic_acc:.3f})")
    coverage = sampler_coverage(engine, champion, first, last, truth, args.coverage_draws)
    say(f"[efficiency] random_sample coverage: {json.dumps(coverage)}")
    dispose_engines()  # no connection may stay open while the file is copied and, below, replaced
    pristine = home / "state.pristine.db"
    shutil.copy2(home / "state.db", pristine)
    held = corpus.held[SHIFT]
    champion_acc = held_out_accuracy(champion, held)
    trials = []
    for seed in range(args.seeds):
        for budget in args.budgets:
            for strategy in ("informative+random", "random"):
                engine.dispose()
                dispose_engines()
                for suffix in ("-wal", "-shm"):
                    Path(str(home / "state.db") + suffix).unlink(missing_ok=True)
                shutil.copy2(pristine, home / "state.db")
                engine = get_engine()
                trials.append(_efficiency_trial(engine, champion, first, last, truth, held, seed, budget, strategy, args))
    return {"sampler_coverage": coverage, "champion_finance_held_out": champion_acc, "held_out_rows": len(held), "traffic_rows": last - first + 1,
            "champion_traffic_accuracy": round(traffic_acc, 4), "random_share": args.random_share, "trials": trials}


def held_out_correct(tag: str, rows: list[tuple[str, str]]) -> list[bool]:
    """Per held-out row, whether registered model `tag` gets it right (the paired tests need items, not rates)."""
    from core.inference import load_predictor  # noqa: PLC0415

    p = load_predictor(tag)
    out = p.predict([t for t, _ in rows])
    return [p.label_names[i] == y for i, (_, y) in zip(out.labels, rows)]


def paired_test(eff: dict, a: tuple[str, int], b: tuple[str, int]) -> dict:
    """Exact McNemar on the held-out items, pooled over seeds (each seed pairs a's and b's refinement
    on the same items): a_only / b_only are items one gets right and the other wrong; p_a_better and
    p_b_better are the one-sided p-values. Seeds share the items, so the pooled counts are not
    independent draws: read p as a guide, and the per-seed differences beside it."""
    from loop.paired import mcnemar_one_sided  # noqa: PLC0415

    flags = {(t["strategy"], t["budget"], t["seed"]): t.get("held_out_correct") for t in eff["trials"]}
    a_only = b_only = 0
    for seed in sorted({t["seed"] for t in eff["trials"]}):
        fa, fb = flags.get((*a, seed)), flags.get((*b, seed))
        if fa and fb:
            a_only += sum(x == "1" and y == "0" for x, y in zip(fa, fb))
            b_only += sum(x == "0" and y == "1" for x, y in zip(fa, fb))
    return {"a": a, "b": b, "a_only": a_only, "b_only": b_only, "p_a_better": mcnemar_one_sided(a_only, b_only),
            "p_b_better": mcnemar_one_sided(b_only, a_only)}


def sampler_coverage(engine, champion: str, first: int, last: int, truth: dict[str, str], draws: int, window: int = 250,
                     n: int = 50) -> dict:
    """Many windows instead of the live runs' few: labels/select.random_sample draws `n` of each
    `window` consecutive logged finance rows, `draws` times per window (seeds 0..draws-1); is the
    correct count inside the central 95 % interval at the window's true accuracy? Hypergeometric
    (exact for a uniform draw without replacement) and binomial (what the live check uses)."""
    from scipy.stats import binom, hypergeom  # noqa: PLC0415

    from labels import select  # noqa: PLC0415

    logged = _logged(engine, first)
    served = {r.request_id: r.label for r in logged}
    out = {"windows": 0, "draws": 0, "inside_hypergeometric": 0, "inside_binomial": 0, "window": window, "n": n}
    for start in range(first, last + 1 - window + 1, window):
        end = start + window - 1
        rids = [r.request_id for r in logged if start <= r.id <= end]
        correct = sum(served[r] == truth[r] for r in rids)
        p = correct / len(rids)
        out["windows"] += 1
        for seed in range(draws):
            picked = select.random_sample(engine, champion, start, end, n, seed=f"coverage:{start}:{seed}")
            k = sum(served[c.request_id] == truth[c.request_id] for c in picked)
            m = len(picked)
            out["draws"] += 1
            out["inside_hypergeometric"] += bool(hypergeom.ppf(0.025, len(rids), correct, m) <= k <= hypergeom.ppf(0.975, len(rids), correct, m))
            out["inside_binomial"] += bool(binom.ppf(0.025, m, p) <= k <= binom.ppf(0.975, m, p))
    return out


def _logged(engine, first: int):
    from sqlalchemy import select  # noqa: PLC0415

    from core import predlog  # noqa: PLC0415

    c = predlog.predictions.c
    with engine.connect() as conn:
        return conn.execute(select(c.id, c.request_id, c.label).where(c.id >= first).order_by(c.id)).all()


def _label_of(engine, request_id: str) -> str:
    from sqlalchemy import select  # noqa: PLC0415

    from core import predlog  # noqa: PLC0415

    c = predlog.predictions.c
    with engine.connect() as conn:
        return conn.execute(select(c.label).where(c.request_id == request_id)).scalar_one()


def efficiency_table(eff: dict) -> tuple[str, dict]:
    by: dict[tuple[str, int], list[float]] = {}
    for t in eff["trials"]:
        by.setdefault((t["strategy"], t["budget"]), []).append(t["finance_held_out"])
    budgets = sorted({b for _, b in by})
    lines = ["| labels | informative+random: held-out finance (per seed) | mean | random only (per seed) | mean | paired diff (mean) |",
             "|---|---|---|---|---|---|"]
    means = {}
    for b in budgets:
        mix, rnd = by.get(("informative+random", b), []), by.get(("random", b), [])
        means[("informative+random", b)] = statistics.mean(mix) if mix else None
        means[("random", b)] = statistics.mean(rnd) if rnd else None
        diff = statistics.mean(m - r for m, r in zip(mix, rnd)) if mix and rnd else None
        lines.append(f"| {b} | {', '.join(f'{a:.3f}' for a in mix)} | {means[('informative+random', b)]:.3f} | "
                     f"{', '.join(f'{a:.3f}' for a in rnd)} | {means[('random', b)]:.3f} | {diff * 100:+.1f} pt |")
    # the strategy's effect: a seed is one replicate (its own sample of labels and its own training run),
    # so the test is over seed x budget pairs; the item-level McNemar below compares two trained models,
    # and its p-values do not carry the run-to-run spread of training
    from scipy.stats import binomtest, ttest_rel  # noqa: PLC0415

    mix_all, rnd_all = [], []
    for b in budgets:
        mix_all += by.get(("informative+random", b), [])[:len(by.get(("random", b), []))]
        rnd_all += by.get(("random", b), [])[:len(by.get(("informative+random", b), []))]
    if len(mix_all) >= 2:
        diffs = [m - r for m, r in zip(mix_all, rnd_all)]
        wins = sum(d > 0 for d in diffs)
        t = ttest_rel(mix_all, rnd_all)
        lines += ["", f"strategy effect over {len(diffs)} seed x budget pairs: mean {statistics.mean(diffs) * 100:+.1f} pt "
                      f"(sd {statistics.stdev(diffs) * 100:.1f} pt), informative+random ahead in {wins}; sign test p "
                      f"{binomtest(wins, len(diffs), 0.5).pvalue:.3g}, paired t p {t.pvalue:.3g} (two-sided)"]
    pairs = [(("informative+random", b), ("random", b)) for b in budgets] + [(("informative+random", 100), ("random", 200))]
    lines += ["", "two trained models on the same held-out items (exact McNemar, pooled over seeds; one-sided p each way; "
                  "model against model, not strategy against strategy):",
              "| comparison | right only by the first | right only by the second | p first better | p second better |", "|---|---|---|---|---|"]
    for a, b in pairs:
        if a in means and b in means:
            t = paired_test(eff, a, b)
            lines.append(f"| {a[0]} {a[1]} vs {b[0]} {b[1]} | {t['a_only']} | {t['b_only']} | {t['p_a_better']:.3g} | {t['p_b_better']:.3g} |")
    return "\n".join(lines), means


# --- the report -----------------------------------------------------------------------------------------

def live_table(runs: list[dict]) -> str:
    lines = ["| run | organic | requests | promoted | minutes onset → promotion | requests sent | labels asked (by purpose/kind) "
             "| answered | refinements | held-out finance / SST-2 before → after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        held = r.get("held_out")
        held_s = (f"{held['finance'][0]:.3f} → {held['finance'][1]:.3f} / {held['sst2'][0]:.3f} → {held['sst2'][1]:.3f}" if held else "")
        when = f"{r['minutes_onset_to_promotion']:.1f}" if r["promoted"] else f"not promoted in {r['minutes_observed']:.0f} min"
        asked = ", ".join(f"{k} {v}" for k, v in sorted(r["asked_by"].items())) or "0"
        started = sum(e["kind"] == "retrain_started" for e in r["refinements"])
        lines.append(f"| {r['run']} | {r['organic_feedback']:.0%} | {'on' if r['label_requests'] else 'off'} | {'yes' if r['promoted'] else 'no'} "
                     f"| {when} | {r['requests_onset_to_end']} | {r['asked']} ({asked}) | {r['answered']} | {started} | {held_s} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--parts", default="scarce,efficiency,organic", help="Comma-separated among scarce, efficiency, organic.")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--stable", type=int, default=1000, help="Stable SST-2 requests before the onset.")
    parser.add_argument("--shift-traffic", type=int, default=1000, help="Finance rows that may be sent (the rest is held out).")
    parser.add_argument("--rate", type=float, default=5.0, help="Finance requests/s from the onset on (cycling over the traffic rows).")
    parser.add_argument("--annotator-delay", type=float, default=20.0, help="Seconds from a task's appearance to its answer, at least.")
    parser.add_argument("--per-task", type=float, default=1.0, help="Seconds the annotator spends on each task.")
    parser.add_argument("--sync-interval", type=float, default=5.0, help="labels.sync_interval_s of the controller.")
    parser.add_argument("--timeout", type=float, default=1200, help="Scarce run: give up this many seconds after the onset.")
    parser.add_argument("--organic", type=lambda s: [float(x) for x in s.split(",")], default=[0.02, 0.05])
    parser.add_argument("--organic-timeout", type=float, default=900, help="Organic runs: give up this many seconds after the onset.")
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[50, 100, 200])
    parser.add_argument("--seeds", type=int, default=3, help="Efficiency: seeds (each: every budget, both strategies).")
    parser.add_argument("--random-share", type=float, default=0.3, help="Efficiency: random share of an informative batch (labels.random_share).")
    parser.add_argument("--coverage-draws", type=int, default=250, help="Unbiasedness offline: random samples drawn per 250-row window.")
    parser.add_argument("--min-window-random", type=int, default=10, help="Unbiasedness: windows with at least this many random labels.")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="Extra controller setting (repeatable).")
    parser.add_argument("--json", action="store_true", help="Print the summary as JSON too.")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    command = "python bench/labels.py " + " ".join(sys.argv[1:])
    say(f"bench home {BASE_HOME}; command: {command}")
    t_all = time.perf_counter()

    corpus = lp.load_corpus(Path(args.data), [SHIFT], train_rows=args.train_rows, stable=args.stable, shift_traffic=args.shift_traffic)
    champion = champion_of(BASE_HOME / "champion", corpus)
    ensure_tokens(BASE_HOME / "champion")
    truth = truth_map(corpus)
    summary: dict = {"command": command, "home": str(BASE_HOME), "champion": champion, "parts": parts,
                     "settings": {k: v for k, v in vars(args).items() if k != "data"}}
    studio = None
    runs: list[dict] = []
    try:
        if "scarce" in parts or "organic" in parts:
            studio, studio_url = start_studio(BASE_HOME / "champion")
        if "scarce" in parts:
            runs.append(live_run("scarce-0pct", corpus, champion, truth, args, feedback=0.0, ask=True, studio_url=studio_url,
                                 timeout_s=args.timeout))
        if "organic" in parts:
            for share in args.organic:
                for ask in (True, False):
                    runs.append(live_run(f"organic-{share * 100:g}pct-{'requests' if ask else 'norequests'}", corpus, champion, truth, args,
                                         feedback=share, ask=ask, studio_url=studio_url, timeout_s=args.organic_timeout))
    finally:
        if studio is not None:
            studio.stop()
    summary["runs"] = runs
    if "efficiency" in parts:
        summary["efficiency"] = efficiency(corpus, champion, args)
    summary["seconds"] = round(time.perf_counter() - t_all)
    (BASE_HOME / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    report(summary, args)


def report(summary: dict, args) -> None:
    print(f"\ncommand: {summary['command']}\nhome: {summary['home']}\nwall: {summary['seconds'] / 60:.1f} min\n")
    targets = []
    runs = summary.get("runs") or []
    if runs:
        print(live_table(runs) + "\n")
    if runs:
        print("minutes from the onset: | run | first drift verdict | first labels asked | last label answered | refinement started "
              "| refinement ended | promotion |\n|---|---|---|---|---|---|---|")
        for r in runs:
            t = r["timeline_min"]
            print(f"| {r['run']} | " + " | ".join("" if t[k] is None else f"{t[k]:.1f}" for k in (
                "first_drift_verdict", "first_labels_asked", "last_label_answered", "retrain_started", "retrain_succeeded", "promotion")) + " |")
        print("\nrandom request batches, in the order the annotator answered (the queue's: least sure first): "
              "| run | purpose | answered | accuracy of the first k / all | served confidence first k / all |\n|---|---|---|---|---|")
        for r in runs:
            for b in r.get("random_batches") or []:
                print(f"| {r['run']} | {b['purpose']} | {b['answered']} | {b['accuracy_first']:.3f} (k={b['first']}) / {b['accuracy_all']:.3f} "
                      f"| {b['confidence_first']:.3f} / {b['confidence_all']:.3f} |")
        print()
    scarce = next((r for r in runs if r["run"].startswith("scarce")), None)
    if scarce:
        targets += [("scarce (0 % organic): promoted", bool(scarce["promoted"]), str(scarce["promoted"])),
                    ("scarce: ≤ 300 labels asked from onset to promotion", bool(scarce["promoted"]) and scarce["asked"] <= 300,
                     f"{scarce['asked']} asked, {scarce['answered']} answered"),
                    ("scarce: ≤ 15 minutes from onset to promotion", bool(scarce["promoted"]) and scarce["minutes_onset_to_promotion"] <= 15,
                     f"{scarce['minutes_observed']:.1f} min")]
    eff = summary.get("efficiency")
    if eff:
        table, means = efficiency_table(eff)
        print(f"label efficiency: champion {eff['champion_finance_held_out']:.3f} on {eff['held_out_rows']} held-out finance rows; "
              f"random share {eff['random_share']}\n{table}\n")
        a, b = means.get(("informative+random", 100)), means.get(("random", 200))
        if a is not None and b is not None:
            targets.append(("efficiency: informative+random at 100 ≥ random at 200 (mean over seeds)", a >= b, f"{a:.3f} vs {b:.3f}"))
    checked = [w for r in runs if r.get("windows") for w in r["windows"]["windows"]]
    if checked:
        inside = sum(w["requested-random"]["inside"] for w in checked)
        inf = [w for w in checked if "requested-informative" in w]
        print(f"unbiasedness: {inside} of {len(checked)} windows (≥ {args.min_window_random} random labels) inside the 95 % interval; "
              f"informative stratum on {len(inf)} of them: {sum(w['requested-informative']['inside'] for w in inf)} inside")
        print("| run | window (log ids) | rows | true accuracy | random n | random realized | 95 % interval | inside | informative n / realized |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            for w in (r.get("windows") or {}).get("windows", []):
                rnd, inf_w = w["requested-random"], w.get("requested-informative")
                informative = f"{inf_w['n']} / {inf_w['realized']:.3f}" if inf_w else ""
                print(f"| {r['run']} | {w['window'][0]}-{w['window'][1]} | {w['rows']} | {w['true_accuracy']:.3f} | {rnd['n']} | {rnd['realized']:.3f} "
                      f"| {rnd['interval'][0]:.3f}-{rnd['interval'][1]:.3f} | {'yes' if rnd['inside'] else 'NO'} | {informative} |")
        targets.append(("unbiasedness (live runs): random-stratum accuracy inside its 95 % interval in ≥ 95 % of windows",
                        inside >= 0.95 * len(checked), f"{inside}/{len(checked)}"))
    cov = (eff or {}).get("sampler_coverage")
    if cov and cov["draws"]:
        print(f"random_sample offline: {cov['draws']} samples of {cov['n']} from {cov['windows']} windows of {cov['window']} finance rows: "
              f"{cov['inside_hypergeometric']} inside the hypergeometric 95 % interval, {cov['inside_binomial']} inside the binomial one")
        targets.append(("unbiasedness (offline, labels/select.random_sample): inside the 95 % interval in ≥ 95 % of samples",
                        cov["inside_hypergeometric"] >= 0.95 * cov["draws"], f"{cov['inside_hypergeometric']}/{cov['draws']} (hypergeometric)"))
    print("\ntargets:")
    for name, ok, detail in targets:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if args.json:
        print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
