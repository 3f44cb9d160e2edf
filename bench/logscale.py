"""The prediction log at scale: per-pass queries, a monitor pass and the policy, /predict p99, disk,
retention under load and a simulated month (docs/benchmarks.md, "Months of traffic").

One run, one engine (SQLite, or a throwaway Postgres cluster from tests/pg.py), scratch data under
--scratch (default /tmp), deleted at the end (--keep leaves it):

1. scale: one log of one model grown step by step (--sizes, default 10k, 100k, 1M, 10M on SQLite;
   10k, 100k, 1M on Postgres) through `predlog.write_batch` in batches, with simulated times at
   --rate rows/s; one row in ten gets feedback (a direct UPDATE by request id, as /feedback makes).
   Rows are real predictions of a registered MiniLM model (the default base model, 384-float
   embeddings) on SST-2 train sentences (texts, descriptors, calibrated probabilities, embeddings),
   the feedback label is the sentence's true label. At each size: every per-pass query of
   core/predlog.py (median of --query-repeats), a full monitor pass (report=False) and the policy
   step after it (median of --pass-repeats), /predict p99 at 32 clients against the real service
   (`driftloop serve`) on that DB (--requests after a warm-up), bytes on disk and per row. On
   SQLite up to --before-max rows, the issue's "before": the same window query forced onto the old
   (model_version, created_at) index.
2. compaction: the service under 32 clients, without and with a retention run (another process,
   as the controller is) compacting or deleting a large backlog of the grown log, interleaved
   (--compaction-rounds each, alternating compaction-only and delete-only runs), for the default
   batch_rows/pause_s and, while they fail the target, each --compaction-settings candidate.
3. month: a fresh log with --per-day synthetic rows a day for --month-days days, a retention run
   (loop/upkeep.run_retention) at the end of each simulated day with raw_days=--raw-days,
   days=--keep-days (on Postgres, day partitions made each day as the controller does), then a
   monitor pass and the policy; per day: bytes, rows, oldest raw row's and oldest row's age,
   retention, monitor and policy seconds. The bytes kept are compared with the same rows packed
   afresh (SQLite: VACUUM INTO a new file; Postgres: VACUUM FULL).

Each target is checked at the end (PASS/FAIL lines). Examples:

    python bench/logscale.py                                     # SQLite: 10k..10M, compaction, month
    python bench/logscale.py --engine postgres                   # Postgres: 10k..1M, compaction, month
    python bench/logscale.py --sizes 10000 100000 --requests 500 --per-day 5000 --month-days 15   # quick
    python bench/logscale.py --parts month --per-day 100000
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
UTC = dt.timezone.utc
SST2 = ROOT.parent / "shared" / "data" / "sst2"
DEFAULT_SIZES = {"sqlite": [10_000, 100_000, 1_000_000, 10_000_000], "postgres": [10_000, 100_000, 1_000_000]}
QUERIES = ("window_rows(last=1000)", "recent_runtime", "fresh_labelled(2000)", "labelled_count", "estimation_error",
           "count_since", "labelled_after", "first_id_at")


def log_event(**kw) -> None:
    print(json.dumps(kw, default=str), flush=True)


def median(values):
    return statistics.median(values) if values else None


def timed(fn, repeats: int = 1) -> tuple[float, object]:
    """(median seconds over `repeats` calls, the last result)."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return median(times), out


def sst2(name: str) -> list[tuple[str, str]]:
    with open(SST2 / name, encoding="utf-8") as fh:
        return [(r["sentence"].strip(), r["label"].strip()) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


# --------------------------------------------------------------------------- the model and the synthetic rows


def train_model(args) -> str:
    """A first production model on SST-2 (the default base model, all-MiniLM-L6-v2), as bench/serve.py makes one."""
    out = subprocess.run([sys.executable, "-m", "driftloop", "train", "--data", str(SST2 / "train.tsv"), "--max-rows",
                          str(args.train_rows), "--epochs", "1", "--quiet", "--json", "--promote", "never", "--set", "report=false"],
                         cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"driftloop train failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)["model"]


class Pool:
    """Real predictions of the model on SST-2 train sentences (what the service would log), with the
    sentences' true labels; the populator draws rows from it at random."""

    def __init__(self, tag: str, n: int, seed: int = 0):
        import numpy as np  # noqa: PLC0415

        from core import predlog  # noqa: PLC0415
        from core.runtimes import load_runtime_predictor  # noqa: PLC0415

        rows = sst2("train.tsv")
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
        texts, self.truth = [rows[i][0] for i in pick], [rows[i][1] for i in pick]
        predictor = load_runtime_predictor(tag, "torch")
        out = predictor.predict(texts, batch_size=32)
        names = predictor.label_names
        self.items = []
        for i, text in enumerate(texts):
            probs = {name: float(out.probs[i, j]) for j, name in enumerate(names)}
            self.items.append(predlog.LoggedPrediction("", text, names[int(out.probs[i].argmax())], float(out.probs[i].max()),
                                                       probs, out.descriptors[i], bool(out.truncated[i]), out.embeddings[i]))
        self.width = int(out.embeddings.shape[1])
        self.accuracy = float(np.mean([it.label == y for it, y in zip(self.items, self.truth)]))
        self.rng = rng


class Populator:
    """Grows one model's log in batches through predlog.write_batch, at simulated times `rate` rows/s
    apart from `start`; every tenth row gets its feedback label in a second transaction."""

    def __init__(self, engine, tag: str, pool: Pool, start: dt.datetime, rate: float, batch: int):
        self.engine, self.tag, self.pool, self.start, self.rate, self.batch = engine, tag, pool, start, rate, batch
        self.n = 0
        self.write_s = 0.0

    def at(self, i: int) -> dt.datetime:
        return self.start + dt.timedelta(seconds=i / self.rate)

    def write(self, k: int, at: dt.datetime) -> None:
        from sqlalchemy import bindparam, update  # noqa: PLC0415

        from core import predlog  # noqa: PLC0415

        c = predlog.predictions.c
        pick = self.pool.rng.integers(0, len(self.pool.items), size=k)
        rows, feedback = [], []
        for j, i in enumerate(pick):
            p = self.pool.items[i]
            rid = os.urandom(16).hex()  # random like the service's uuid4 hex (random inserts into the request_id index)
            rows.append(predlog.LoggedPrediction(rid, p.text, p.label, p.confidence, p.probs, p.descriptors, p.truncated, p.embedding))
            if (self.n + j) % 10 == 0:
                feedback.append({"rid": rid, "fb": self.pool.truth[i], "fb_at": at})
        predlog.write_batch(self.engine, self.tag, rows, at=at)
        if feedback:
            stmt = (update(predlog.predictions).where(c.request_id == bindparam("rid"))
                    .values(feedback_label=bindparam("fb"), feedback_at=bindparam("fb_at")))
            with self.engine.begin() as conn:
                conn.execute(stmt, feedback)
        self.n += k

    def grow_to(self, target: int) -> float:
        """Write rows until the populator has written `target`; returns the rows per second it took."""
        t0, n0 = time.perf_counter(), self.n
        last = t0
        while self.n < target:
            k = min(self.batch, target - self.n)
            self.write(k, self.at(self.n))
            if time.perf_counter() - last > 60:
                last = time.perf_counter()
                log_event(populating=self.n, target=target, rows_per_s=round((self.n - n0) / (last - t0)))
        seconds = time.perf_counter() - t0
        self.write_s += seconds
        return (self.n - n0) / seconds if seconds else 0.0


# --------------------------------------------------------------------------- engines, the service, the load


class Engines:
    """Scratch databases of one engine: SQLite files under the scratch directory, or databases of one
    throwaway Postgres cluster (tests/pg.py: loopback, fsync off, shared_buffers 32 MB)."""

    def __init__(self, kind: str, scratch: Path):
        self.kind, self.scratch, self.cluster = kind, scratch, None
        if kind == "postgres":
            from tests.pg import PostgresCluster, find_bin_dir  # noqa: PLC0415

            bin_dir = find_bin_dir()
            if bin_dir is None:
                raise SystemExit("PostgreSQL server binaries not found (apt-get install postgresql)")
            self.cluster = PostgresCluster(bin_dir).start()

    def new(self, name: str) -> str:
        if self.kind == "sqlite":
            return f"sqlite:///{self.scratch / (name + '.db')}"
        return self.cluster.create_database(prefix=name)

    def drop(self, url: str) -> None:
        from core.statedb import dispose_engine  # noqa: PLC0415

        dispose_engine(url)
        if self.kind == "sqlite":
            path = Path(url.removeprefix("sqlite:///"))
            for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
                p.unlink(missing_ok=True)
        else:
            import psycopg  # noqa: PLC0415

            name = url.rsplit("/", 1)[1]
            with psycopg.connect(f"host=127.0.0.1 port={self.cluster.port} user=postgres dbname=postgres", autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def open_log(url: str, tag: str):
    """The state DB at `url` with the log's schema and `tag` as its production model (a first model: no
    bake); returns (engine, writer): the engine every measured read uses, as the stages open it, and
    the populator's own. On SQLite the populator's connections have a 256 MiB page cache and a WAL
    checkpoint every 80 MiB instead of 4 MiB: twice the rows per second while populating, and the
    same file (these settings are per connection and change no page of the database)."""
    from sqlalchemy import event  # noqa: PLC0415

    from core import predlog, production  # noqa: PLC0415
    from core.statedb import get_engine  # noqa: PLC0415

    engine = get_engine(url)
    predlog.ensure_schema(engine)
    production.promote(tag, reason="bench/logscale.py", actor="bench", engine=engine, verify=False)
    writer = get_engine(url, lock_timeout_s=30)  # a second engine (get_engine keys on the lock timeout)
    if writer.dialect.name == "sqlite":
        @event.listens_for(writer, "connect")
        def _bulk(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA cache_size=-262144")
            cur.execute("PRAGMA wal_autocheckpoint=20000")
            cur.close()
    return engine, writer


class Service:
    """`driftloop serve` (the real service: BentoML, ONNX Runtime by default, the prediction log) on a free port."""

    def __init__(self, url: str, scratch: Path):
        from bench.serve import free_port  # noqa: PLC0415

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DRIFTLOOP_DB_URL": url}
        env.pop("BENTOML_HOME", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log = open(scratch / f"serve-{self.port}.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "driftloop", "serve", "--port", str(self.port)], cwd=ROOT, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import httpx  # noqa: PLC0415

        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"driftloop serve exited with {self.proc.returncode}: see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError("driftloop serve not ready in 600 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        self.log.close()


def load(url: str, texts: list[str], requests: int, concurrency: int = 32, warmup: int = 200) -> dict:
    """`requests` single-text /predict calls from `concurrency` closed-loop clients (bench/serve.py's
    asyncio client), after `warmup` unreported ones."""
    from bench.serve import _load  # noqa: PLC0415

    if warmup:
        asyncio.run(_load(url, texts, concurrency, 3600, warmup))
    return asyncio.run(_load(url, texts, concurrency, 3600, requests))


# --------------------------------------------------------------------------- 1. scale


def query_times(engine, tag: str, pop: Populator, repeats: int) -> dict[str, float]:
    from core import predlog  # noqa: PLC0415

    newest = predlog.max_id(engine)
    mid_time = pop.at(pop.n // 2)
    promoted = pop.at(max(0, pop.n - 5000))  # a promotion 5,000 rows ago: the bake's 200 labelled items lie after it
    calls = {
        "window_rows(last=1000)": lambda: predlog.window_rows(engine, tag, last=1000),
        "recent_runtime": lambda: predlog.recent_runtime(engine, tag),
        "fresh_labelled(2000)": lambda: predlog.fresh_labelled(engine, tag, None, 2000),
        "labelled_count": lambda: predlog.labelled_count(engine, tag, None, None, with_text=True),
        "estimation_error": lambda: predlog.estimation_error(engine, tag),
        "count_since": lambda: predlog.count_since(engine, tag, newest - 1000, cap=200),
        "labelled_after": lambda: predlog.labelled_after(engine, tag, promoted, 200),
        "first_id_at": lambda: predlog.first_id_at(engine, mid_time),
    }
    return {name: timed(fn, repeats)[0] for name, fn in calls.items()}


def monitor_and_policy(engine, tag: str, repeats: int, baseline=None) -> dict:
    """A monitor pass as the controller runs it (report off) and the policy step after it (dry run:
    the same reads; a 'retrain' decision would not start a refinement): medians of wall and CPU
    seconds (this process's CPU: the SQLite reads and the tests; less disturbed by other work on
    the machine than wall time). With `baseline` (another log's engine), each repeat also runs the
    same on it right after, so both are measured over the same spell of this shared machine."""
    from loop.act import after_pass  # noqa: PLC0415
    from loop.policy import PolicyConfig  # noqa: PLC0415
    from loop.refine_config import RefineConfig  # noqa: PLC0415
    from loop.refine_jobs import RefineJobs  # noqa: PLC0415
    from monitoring.config import MonitorConfig  # noqa: PLC0415
    from monitoring.passes import monitor_once  # noqa: PLC0415
    from monitoring.verdict import Verdict  # noqa: PLC0415

    def one(eng) -> tuple[float, float, float, float, str, bool]:
        c0, t0 = time.process_time(), time.perf_counter()
        stored = monitor_once(eng, MonitorConfig(report=False), model_version=tag)
        t1 = time.perf_counter()
        out = after_pass(eng, Verdict.from_json(stored.to_json()), PolicyConfig(dry_run=True), RefineConfig(), RefineJobs())
        t2, c2 = time.perf_counter(), time.process_time()
        return t1 - t0, t2 - t1, t2 - t0, c2 - c0, out.get("action"), stored.result.drift

    runs, base = [], []
    for _ in range(repeats):
        runs.append(one(engine))
        if baseline is not None:
            base.append(one(baseline))
    out = {"monitor_s": median([r[0] for r in runs]), "policy_s": median([r[1] for r in runs]),
           "pass_policy_s": median([r[2] for r in runs]), "pass_policy_cpu_s": median([r[3] for r in runs]),
           "decision": runs[-1][4], "drift": runs[-1][5]}
    if base:
        out.update({"baseline_pass_policy_s": median([r[2] for r in base]), "baseline_pass_policy_cpu_s": median([r[3] for r in base]),
                    "paired_ratio": median([r[2] / b[2] for r, b in zip(runs, base)])})
    return out


def before_window(engine, tag: str, repeats: int = 1) -> dict:
    """The issue's 'before': window_rows(last=1000)'s query on the old (model_version, created_at) index."""
    from core.descriptors import DESCRIPTOR_COLUMNS  # noqa: PLC0415

    cols = ", ".join([*(f"p.{c}" for c in ("id", "created_at", "label", "confidence", "probs", "truncated")),
                      "COALESCE(r.embedding, p.embedding)", *(f"p.{c}" for c in ("feedback_label", "runtime", *DESCRIPTOR_COLUMNS))])
    sql = (f"SELECT {cols} FROM predictions AS p INDEXED BY ix_old LEFT JOIN prediction_raw AS r ON r.id = p.id "
           "WHERE p.model_version = ? ORDER BY p.id DESC LIMIT 1000")
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_old ON predictions (model_version, created_at)")
    build = time.perf_counter() - t0
    try:
        with engine.connect() as conn:
            plan = " | ".join(r[-1] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", (tag,)))
            seconds, rows = timed(lambda: conn.exec_driver_sql(sql, (tag,)).all(), repeats)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP INDEX IF EXISTS ix_old")
    return {"old_window_s": seconds, "old_index_build_s": build, "old_plan": plan, "rows": len(rows)}


def disk(engine) -> int:
    from core import retention  # noqa: PLC0415

    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:  # what a running log settles at: the WAL moved into the file
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    return int(retention.file_bytes(engine) or 0)


def scale(args, engines: Engines, tag: str, pool: Pool, texts: list[str], results: dict):
    from core import predlog  # noqa: PLC0415

    url = engines.new("scale")
    engine, writer = open_log(url, tag)
    now = dt.datetime.now(UTC)
    top = max(args.sizes)
    start = now - dt.timedelta(seconds=top / args.rate) - dt.timedelta(days=1)  # the whole log lies in the past
    if engine.dialect.name == "postgresql":
        from core import partitions  # noqa: PLC0415

        day = start.date()
        while day <= now.date():  # the day partitions the controller would have made over those days
            partitions.ensure_days(engine, today=day, ahead=0)
            day += dt.timedelta(days=1)
    pop = Populator(writer, tag, pool, start, args.rate, args.batch)
    # a second log of the smallest size, measured right after the growing one at every size: the
    # ratio of each pair is free of this shared machine's slow spells (others' test suites)
    base_url = engines.new("baseline")
    baseline, base_writer = open_log(base_url, tag)
    Populator(base_writer, tag, pool, start, args.rate, args.batch).grow_to(min(args.sizes))
    service = Service(url, engines.scratch)
    rows_out = []
    try:
        first_rate = pop.grow_to(min(args.sizes))
        monitor_and_policy(engine, tag, 1, baseline)  # warm-up, not reported: the first pass loads the reference profile
        for size in sorted(args.sizes):
            rate = pop.grow_to(size) if size > pop.n else first_rate
            log_event(size=size, populate_rows_per_s=round(rate), log_max_id=predlog.max_id(engine))
            row = {"size": size, "populate_rows_per_s": round(rate)}
            row["queries"] = query_times(engine, tag, pop, args.query_repeats)
            row.update(monitor_and_policy(engine, tag, args.pass_repeats, baseline))
            if engine.dialect.name == "sqlite" and size <= args.before_max:
                row.update(before_window(engine, tag))
            row["load"] = load(service.url, texts, args.requests)
            row["bytes"] = disk(engine)
            row["rows"] = predlog.max_id(engine)  # ids are dense: every row written (the service's included)
            row["bytes_per_row"] = row["bytes"] / row["rows"]
            log_event(scale=row)
            rows_out.append(row)
            results["scale"] = rows_out
        if "compaction" in args.parts:
            results["compaction"] = compaction(args, url, engine, service, texts)
    finally:
        service.stop()
        engines.drop(url)
        engines.drop(base_url)


# --------------------------------------------------------------------------- 2. compaction under load


def retention_worker(url: str, mode: str, batch_rows: int, pause_s: float) -> None:
    """The retention run of the compaction test, in its own process as the controller's is: 'compact'
    deletes the text and embedding of every row older than 15 minutes (nothing else); 'delete'
    deletes every row older than 15 minutes. Runs until stopped."""
    from core import retention  # noqa: PLC0415
    from core.statedb import get_engine  # noqa: PLC0415

    engine = get_engine(url)
    quarter_hour = 15 / (24 * 60)
    days = (3650.0, quarter_hour) if mode == "compact" else (quarter_hour, quarter_hour)
    config = retention.RetentionConfig(days=days[0], raw_days=days[1], batch_rows=batch_rows, pause_s=pause_s, max_run_s=3600)
    print("ready", flush=True)
    while True:
        # "now" a day ahead: every row already logged is past the cutoff, the service's own among them. The
        # log's backdated rows interleave their ids with the service's rows of earlier rounds, and retention
        # cuts by id (ids follow time in a real log): with the real now, rows the service logged less than 15
        # minutes ago would stop the cut below most of the backlog (seen: 10,000 rows a round on a 1 M log)
        result = retention.run(engine, config, now=dt.datetime.now(UTC) + dt.timedelta(days=1))
        print(json.dumps(result.to_json()), flush=True)
        if not (result.compacted or result.deleted):
            time.sleep(1)


def _edges(engine) -> tuple[int, int]:
    """(oldest row id, oldest raw row id): both O(log n) probes; their moves count the rows a round deleted or compacted."""
    from core import predlog  # noqa: PLC0415

    with engine.connect() as conn:
        lo = conn.exec_driver_sql("SELECT min(id) FROM predictions").scalar()
        if engine.dialect.name == "postgresql":  # whole days go there, and this log's backdated days interleave ids with
            # today's (the service's rows): count what is left (- so that a drop moves the edge up by the rows it took)
            return int(lo or 0), -int(conn.exec_driver_sql("SELECT count(*) FROM prediction_raw").scalar())
        raw = conn.exec_driver_sql("SELECT min(id) FROM prediction_raw").scalar()
        if raw is None:  # nothing raw left: all compacted up to the newest row
            raw = predlog.max_id(engine) + 1
    return int(lo or 0), int(raw or 0)


def compaction(args, url: str, engine, service: Service, texts: list[str]) -> list[dict]:
    from core.retention import RetentionConfig  # noqa: PLC0415

    default = RetentionConfig()
    candidates = [(default.batch_rows, default.pause_s)] + [tuple(map(float, s.split(":"))) for s in args.compaction_settings]
    out = []
    for batch_rows, pause_s in candidates:
        batch_rows = int(batch_rows)
        rounds = []
        # on Postgres both deleting old rows and compacting are DROPs of day partitions (milliseconds): the
        # first round drops the whole backlog, so there one compaction round is measured under load
        modes = ["compact", "delete"] if engine.dialect.name == "sqlite" else ["compact"]
        for r, mode in enumerate(modes * (args.compaction_rounds if engine.dialect.name == "sqlite" else 1)):
            for with_retention in (False, True):  # paired: a round without, then one with
                worker = None
                before = _edges(engine)
                if with_retention:
                    worker = subprocess.Popen([sys.executable, __file__, "--retention-worker", url, mode, str(batch_rows), str(pause_s)],
                                              cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, text=True, start_new_session=True)
                    if worker.stdout.readline().strip() != "ready":
                        raise RuntimeError("retention worker did not start")
                t0 = time.perf_counter()
                try:
                    res = load(service.url, texts, args.requests, warmup=200 if r == 0 and not with_retention else 0)
                finally:
                    seconds = time.perf_counter() - t0
                    if worker is not None:
                        os.killpg(worker.pid, signal.SIGTERM)
                        worker.wait(timeout=60)
                        runs = [json.loads(line) for line in worker.stdout.read().splitlines() if line.startswith("{")]
                        log_event(retention_runs=[{k: x[k] for k in ("compacted", "deleted", "partitions_dropped", "kept", "seconds")}
                                                  for x in runs[:5]], runs=len(runs))
                after = _edges(engine)
                done = (after[0] - before[0] if mode == "delete" else after[1] - before[1]) if with_retention else 0
                row = {"batch_rows": batch_rows, "pause_s": pause_s, "round": r + 1, "retention": mode if with_retention else "none",
                       **res, "retention_rows": done, "retention_rows_per_s": round(done / seconds)}
                log_event(compaction=row)
                rounds.append(row)
        without = [x for x in rounds if x["retention"] == "none"]
        with_ = [x for x in rounds if x["retention"] != "none"]
        p99_without, p99_with = median([x["p99_ms"] for x in without]), median([x["p99_ms"] for x in with_])
        summary = {"batch_rows": batch_rows, "pause_s": pause_s, "rounds": rounds, "p99_without_ms": p99_without,
                   "p99_with_ms": p99_with, "ratio": p99_with / p99_without, "errors_with": sum(x["errors"] for x in with_),
                   "errors_without": sum(x["errors"] for x in without),
                   "rows_per_s": {m: median([x["retention_rows_per_s"] for x in with_ if x["retention"] == m]) for m in modes}}
        # a round in which retention did nothing measures nothing (seen on Postgres: docs/benchmarks.md)
        summary["retention_progressed"] = all(x["retention_rows"] > 0 for x in with_)
        summary["pass"] = summary["ratio"] <= 1.2 and summary["errors_with"] == 0 and summary["retention_progressed"]
        # the traffic this setting keeps up with: every row is compacted once and deleted once, by runs of at
        # most max_run_s every interval_s (the shipped schedule)
        rates = [v for v in summary["rows_per_s"].values() if v]
        if rates:
            per_row_s = sum(1 / v for v in rates) if len(rates) == 2 else 2 / rates[0]
            summary["sustained_rows_per_s"] = round(default.max_run_s / default.interval_s / per_row_s, 1)
        log_event(compaction_summary={k: v for k, v in summary.items() if k != "rounds"})
        out.append(summary)
        if summary["pass"] and not args.compaction_all:
            break
    return out


# --------------------------------------------------------------------------- 3. a simulated month


def packed_bytes(engine, scratch: Path) -> int:
    """The bytes the rows kept take freshly packed: SQLite VACUUM INTO a new file; Postgres VACUUM FULL."""
    from core import retention  # noqa: PLC0415

    if engine.dialect.name == "sqlite":
        target = scratch / "packed.db"
        target.unlink(missing_ok=True)
        with engine.connect() as conn:
            conn.exec_driver_sql(f"VACUUM INTO '{target}'")
        size = target.stat().st_size
        target.unlink()
        return size
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("SET statement_timeout = 0")
        conn.exec_driver_sql("VACUUM FULL predictions")
        conn.exec_driver_sql("VACUUM FULL prediction_raw")
    return int(retention.file_bytes(engine) or 0)


def month(args, engines: Engines, tag: str, pool: Pool, results: dict) -> None:
    from core import retention  # noqa: PLC0415
    from loop.upkeep import run_retention  # noqa: PLC0415

    url = engines.new("month")
    engine, writer = open_log(url, tag)
    config = retention.RetentionConfig(raw_days=args.raw_days, days=args.keep_days, max_run_s=args.month_max_run_s)
    first_day = (dt.datetime.now(UTC) - dt.timedelta(days=args.month_days + 2)).replace(hour=0, minute=0, second=0, microsecond=0)
    batch = max(1, min(args.batch, args.per_day // 96))  # a write at least every 15 simulated minutes
    pop = Populator(writer, tag, pool, first_day, args.per_day / 86400, batch)
    days = []
    try:
        for d in range(args.month_days):
            day_start = first_day + dt.timedelta(days=d)
            if engine.dialect.name == "postgresql":
                from core import partitions  # noqa: PLC0415

                partitions.ensure_days(engine, today=day_start.date())  # the controller's retention run makes them ahead too
            rate = pop.grow_to((d + 1) * args.per_day)
            now = day_start + dt.timedelta(days=1, minutes=5)  # the retention run just after the day ends
            ret_s, summary = timed(lambda: run_retention(engine, config, now=now))
            stats = retention.stats(engine, config, now=now)
            if engine.dialect.name == "postgresql":  # stats' row count is the id span: the exact count, as a check
                with engine.connect() as conn:
                    stats["rows"] = int(conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar())
            mp = monitor_and_policy(engine, tag, 1)
            age = lambda iso: (now - dt.datetime.fromisoformat(iso)).total_seconds() / 86400 if iso else None  # noqa: E731
            row = {"day": d + 1, "bytes": disk(engine) if engine.dialect.name == "sqlite" else stats["bytes"],
                   "rows": stats["rows"], "oldest_raw_age_d": age(stats["oldest_raw_at"]), "oldest_age_d": age(stats["oldest_at"]),
                   "retention_s": ret_s, "compacted": summary["compacted"], "deleted": summary["deleted"],
                   "partitions_dropped": len(summary["partitions_dropped"]), "vacuumed_pages": summary["vacuumed_pages"],
                   "finished": summary["finished"], "populate_rows_per_s": round(rate), **mp}
            log_event(month=row)
            days.append(row)
            results["month"] = {"days": days}
        exact_rows = None
        if engine.dialect.name == "postgresql":  # stats' row count is the id span: the exact count, as a check
            with engine.connect() as conn:
                exact_rows = int(conn.exec_driver_sql("SELECT count(*) FROM predictions").scalar())
        results["month"].update({"packed_bytes": packed_bytes(engine, engines.scratch), "exact_rows": exact_rows,
                                 "per_day": args.per_day, "raw_days": args.raw_days, "keep_days": args.keep_days})
    finally:
        engines.drop(url)


# --------------------------------------------------------------------------- tables and checks


def fmt_s(x) -> str:
    return "" if x is None else (f"{x * 1000:.1f} ms" if x < 1 else f"{x:.2f} s")


def fmt_bytes(b) -> str:
    return "" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def report(args, results: dict) -> list[tuple[str, bool, str]]:
    checks: list[tuple[str, bool, str]] = []
    engine = args.engine
    scale_rows = results.get("scale") or []
    if scale_rows:
        base = scale_rows[0]
        sizes = [f"{r['size']:,}" for r in scale_rows]
        print(f"\n### Scale ({engine}; ratio: against {base['size']:,} rows, same run)\n")
        print("| measure | " + " | ".join(sizes) + " | ratio at " + sizes[-1] + " |")
        print("|---|" + "---|" * (len(sizes) + 1))

        def line(name, get, fmt, ratio=True):
            vals = [get(r) for r in scale_rows]
            r = (f"{vals[-1] / vals[0]:.2f}x" if ratio and vals[0] and vals[-1] is not None else "")
            print(f"| {name} | " + " | ".join(fmt(v) for v in vals) + f" | {r} |")

        for q in QUERIES:
            line(q, lambda r, q=q: r["queries"][q], fmt_s)
        line("monitor pass (report=False)", lambda r: r["monitor_s"], fmt_s)
        line("policy run (after_pass)", lambda r: r["policy_s"], fmt_s)
        line("**monitor pass + policy**", lambda r: r["pass_policy_s"], fmt_s)
        line("monitor pass + policy, CPU seconds", lambda r: r["pass_policy_cpu_s"], fmt_s)
        line(f"the same on a {base['size']:,}-row log right after (interleaved)", lambda r: r.get("baseline_pass_policy_s"), fmt_s)
        line("**paired ratio** (this size / that log, median of pairs)", lambda r: r.get("paired_ratio"), lambda v: f"{v:.2f}x", ratio=False)
        if any("old_window_s" in r for r in scale_rows):
            line("before: window on (model_version, created_at)", lambda r: r.get("old_window_s"), fmt_s, ratio=False)
        line("/predict p50 (32 clients)", lambda r: r["load"]["p50_ms"] / 1000, fmt_s)
        line("/predict p99 (32 clients)", lambda r: r["load"]["p99_ms"] / 1000, fmt_s)
        line("/predict req/s", lambda r: r["load"]["req_per_s"], lambda v: f"{v:.1f}")
        line("/predict errors", lambda r: r["load"]["errors"], str, ratio=False)
        line("bytes on disk", lambda r: r["bytes"], fmt_bytes)
        line("bytes per row", lambda r: r["bytes_per_row"], lambda v: f"{v:,.0f}")
        line("populate rows/s (this step)", lambda r: r["populate_rows_per_s"], lambda v: f"{v:,}", ratio=False)
        print("\ndecisions: " + ", ".join(f"{r['size']:,}: drift={r['drift']} {r['decision']}" for r in scale_rows))
        for r in scale_rows:
            if "old_plan" in r:
                print(f"before at {r['size']:,}: {fmt_s(r['old_window_s'])} (plan: {r['old_plan']}; index built in {r['old_index_build_s']:.1f} s)")
        top = scale_rows[-1]
        ratio = top["pass_policy_s"] / base["pass_policy_s"]
        checks.append((f"monitor pass + policy at {top['size']:,} <= 1.5x at {base['size']:,} (wall, each measured at its own time)", ratio <= 1.5,
                       f"{fmt_s(top['pass_policy_s'])} vs {fmt_s(base['pass_policy_s'])} = {ratio:.2f}x"))
        cpu = top["pass_policy_cpu_s"] / base["pass_policy_cpu_s"]
        checks.append((f"monitor pass + policy at {top['size']:,} <= 1.5x at {base['size']:,} (CPU seconds)", cpu <= 1.5,
                       f"{fmt_s(top['pass_policy_cpu_s'])} vs {fmt_s(base['pass_policy_cpu_s'])} = {cpu:.2f}x"))
        if top.get("paired_ratio") is not None:
            checks.append((f"monitor pass + policy at {top['size']:,} <= 1.5x a {base['size']:,}-row log measured in the same moments (paired)",
                           top["paired_ratio"] <= 1.5, f"median of {args.pass_repeats} pairs {top['paired_ratio']:.2f}x"))
        errors = sum(r["load"]["errors"] for r in scale_rows)
        checks.append(("no /predict errors at any size", errors == 0, f"{errors} errors"))
    for s in results.get("compaction") or []:
        print(f"\n### Compaction under load ({engine}; batch_rows={s['batch_rows']}, pause_s={s['pause_s']}; {args.requests} requests "
              "per round at 32 clients)\n")
        print("| round | retention | p50 ms | p99 ms | req/s | errors | rows retention did | its rows/s |")
        print("|---|---|---|---|---|---|---|---|")
        for x in s["rounds"]:
            print(f"| {x['round']} | {x['retention']} | {x['p50_ms']} | {x['p99_ms']} | {x['req_per_s']} | {x['errors']} | "
                  f"{x['retention_rows']:,} | {x['retention_rows_per_s']:,} |")
        print(f"\nmedian p99 without {s['p99_without_ms']} ms, with {s['p99_with_ms']} ms ({s['ratio']:.2f}x); errors with "
              f"{s['errors_with']}, without {s['errors_without']}; retention rows/s under this load (median): {s['rows_per_s']}; "
              f"traffic it keeps up with at max_run_s/interval_s = 600/3600: {s.get('sustained_rows_per_s')} rows/s")
        checks.append((f"compaction under load, batch_rows={s['batch_rows']} pause_s={s['pause_s']}: p99 <= 1.2x and 0 errors, "
                       "retention working in every round", s["pass"],
                       f"{s['ratio']:.2f}x, {s['errors_with']} errors, rows per round: "
                       + ", ".join(f"{x['retention_rows']:,}" for x in s["rounds"] if x["retention"] != "none")))
    m = results.get("month")
    if m and m.get("days"):
        days = m["days"]
        print(f"\n### A simulated month ({engine}; {args.per_day:,} rows/day; raw_days={args.raw_days:g}, days={args.keep_days:g}; "
              "retention at 00:05 after each day)\n")
        print("| day | bytes | rows | oldest raw (days) | oldest (days) | retention run | compacted | deleted | partitions dropped "
              "| pages vacuumed | monitor + policy |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in days:
            print(f"| {r['day']} | {fmt_bytes(r['bytes'])} | {r['rows']:,} | {r['oldest_raw_age_d']:.2f} | {r['oldest_age_d']:.2f} | "
                  f"{fmt_s(r['retention_s'])}{'' if r['finished'] else ' (cut)'} | {r['compacted']:,} | {r['deleted']:,} | "
                  f"{r['partitions_dropped']} | {r['vacuumed_pages']:,} | {fmt_s(r['pass_policy_s'])} |")
        tail = days[-5:] if len(days) >= args.keep_days + 5 else []
        if tail:
            b = [r["bytes"] for r in tail]
            checks.append(("month: bytes flatten (last 5 days within 5 %)", max(b) <= 1.05 * min(b), f"{fmt_bytes(min(b))}..{fmt_bytes(max(b))}"))
            rows = [r["rows"] for r in tail]
            want = args.keep_days * args.per_day
            checks.append(("month: rows flatten at days x traffic (within 2 %)", all(abs(x - want) <= 0.02 * want + 2 for x in rows),
                           f"{min(rows):,}..{max(rows):,}; days x traffic {want:,}" + (f"; exact count at the end {m['exact_rows']:,}" if m.get("exact_rows") else "")))
            raw = [r["oldest_raw_age_d"] for r in tail]
            checks.append(("month: oldest raw row's age flat at <= raw_days + 5 min", max(raw) <= args.raw_days + 0.01 and max(raw) - min(raw) < 0.05,
                           f"{min(raw):.2f}..{max(raw):.2f} days"))
            old = [r["oldest_age_d"] for r in tail]
            checks.append(("month: oldest row's age flat at <= days + 5 min", max(old) <= args.keep_days + 0.01 and max(old) - min(old) < 0.05,
                           f"{min(old):.2f}..{max(old):.2f} days"))
            first = median([r["pass_policy_s"] for r in days[:5]])
            last = median([r["pass_policy_s"] for r in tail])
            checks.append(("month: monitor pass + policy flat (last 5 days' median <= 1.5x the first 5's)", last <= 1.5 * first,
                           f"{fmt_s(first)} -> {fmt_s(last)}"))
            rt = [r["retention_s"] for r in tail]
            checks.append(("month: every retention run finished", all(r["finished"] for r in days), f"last 5 days {fmt_s(min(rt))}..{fmt_s(max(rt))}"))
            untouched = [r for r in days if r["rows"] and not (r["compacted"] or r["deleted"] or r["partitions_dropped"])]
            b_raw = untouched[-1]["bytes"] / untouched[-1]["rows"] if untouched else None
            if b_raw:
                bound = args.keep_days * args.per_day * b_raw
                ratio = days[-1]["bytes"] / bound
                checks.append(("month: disk after retention within 10 % of days x traffic x bytes per row (as written)", ratio <= 1.10,
                               f"{fmt_bytes(days[-1]['bytes'])} vs {args.keep_days:g} d x {args.per_day:,}/d x {b_raw:,.0f} B "
                               f"(day {untouched[-1]['day']}, before retention touched a row) = {fmt_bytes(bound)}: {ratio:.2f}x"))
            ratio = days[-1]["bytes"] / m["packed_bytes"]
            checks.append(("month: disk after retention within 10 % of the same rows packed afresh (compaction's saving on disk)",
                           ratio <= 1.10, f"{fmt_bytes(days[-1]['bytes'])} vs {fmt_bytes(m['packed_bytes'])} packed = {ratio:.2f}x"))
        else:
            checks.append(("month: long enough to flatten", False, f"{len(days)} days < keep_days + 5"))
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name}: {detail}")
    return checks


# --------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--retention-worker":
        url, mode, batch_rows, pause_s = sys.argv[2:6]
        return retention_worker(url, mode, int(batch_rows), float(pause_s))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--parts", nargs="+", choices=["scale", "compaction", "month"], default=["scale", "compaction", "month"])
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="Log sizes to measure at (default: 10k..10M on SQLite, ..1M on Postgres).")
    p.add_argument("--rate", type=float, default=100.0, help="Simulated traffic of the scale log, rows/s (its time span).")
    p.add_argument("--batch", type=int, default=2000, help="Rows per write_batch while populating.")
    p.add_argument("--requests", type=int, default=2000, help="/predict requests per load (after 200 warm-up ones).")
    p.add_argument("--query-repeats", type=int, default=5)
    p.add_argument("--pass-repeats", type=int, default=3)
    p.add_argument("--before-max", type=int, default=1_000_000, help="SQLite: the old index's window query up to this size.")
    p.add_argument("--compaction-rounds", type=int, default=2, help="Rounds of each retention mode (compact, delete), each with a paired round without.")
    p.add_argument("--compaction-settings", nargs="*", default=["1000:0.5", "500:0.5", "200:0.5"],
                   help="batch_rows:pause_s candidates tried in order after the defaults, while they fail.")
    p.add_argument("--compaction-all", action="store_true", help="Measure every candidate, not only until one passes.")
    p.add_argument("--per-day", type=int, default=100_000, help="Month: synthetic rows per simulated day.")
    p.add_argument("--month-days", type=int, default=30)
    p.add_argument("--raw-days", type=float, default=3.0)
    p.add_argument("--keep-days", type=float, default=10.0)
    p.add_argument("--month-max-run-s", type=float, default=600.0, help="Month: retention.max_run_s (default: the shipped 600).")
    p.add_argument("--train-rows", type=int, default=1000)
    p.add_argument("--pool", type=int, default=2000, help="Distinct SST-2 train sentences the synthetic rows are drawn from.")
    p.add_argument("--scratch", default="/tmp")
    p.add_argument("--keep", action="store_true", help="Leave the scratch directory.")
    p.add_argument("--json", default=None, help="Also write every figure to this file.")
    args = p.parse_args()
    args.sizes = sorted(args.sizes or DEFAULT_SIZES[args.engine])
    scratch = Path(tempfile.mkdtemp(prefix="driftloop-logscale-", dir=args.scratch))
    os.environ["DRIFTLOOP_HOME"] = str(scratch / "home")
    os.environ.pop("BENTOML_HOME", None)
    os.environ.pop("DRIFTLOOP_DB_URL", None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable.replace(str(ROOT) + "/", ""), *sys.argv]), flush=True)
    started = time.perf_counter()
    results: dict = {"args": vars(args), "machine": {"cpus": os.cpu_count()}}
    engines = None
    try:
        tag = train_model(args)
        log_event(trained=tag, seconds=round(time.perf_counter() - started, 1))
        pool = Pool(tag, args.pool)
        log_event(model=tag, embedding_width=pool.width, pool=len(pool.items), pool_accuracy=round(pool.accuracy, 3),
                  seconds=round(time.perf_counter() - started, 1))
        texts = [t for t, _ in sst2("test.tsv")]
        engines = Engines(args.engine, scratch)
        if "scale" in args.parts:
            scale(args, engines, tag, pool, texts, results)
        if "month" in args.parts:
            month(args, engines, tag, pool, results)
    finally:
        results["wall_s"] = round(time.perf_counter() - started, 1)
        if engines is not None:
            engines.close()
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    report(args, results)
    print(f"\nwall time {results['wall_s'] / 60:.1f} min on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
