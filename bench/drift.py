"""Drift detection through the real service: false alarms, detection delay, accuracy estimate, speed.

A MiniLM classifier is fine-tuned on SST-2 train rows (its validation split is the reference), served
by the real BentoML service (`driftloop serve`), and sent, request by request on loopback:
  1. stable traffic: disjoint SST-2 train rows (the reference's own distribution),
  2. yelp review sentences (a benign shift), 3. imdb review sentences,
with feedback labels for a share of the requests, and a monitor pass (last `--window` predictions)
every `--every` requests. The phase switches fall off the pass grid on purpose (stable phase of
3,100 requests): a pass every 250 requests cannot see a switch sooner than the next pass.

Then: the embedding test's false-alarm rate against Evidently's default embedding drift on stable
windows, and the pass duration on 1,000- and 5,000-row windows.

    python bench/drift.py                    # ~15 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DRIFTLOOP_HOME", tempfile.mkdtemp(prefix="driftloop-bench-drift-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from serve import free_port, start, stop  # noqa: E402

from core.home import configure_environment  # noqa: E402

configure_environment()


def read_rows(path: Path) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        if path.suffix == ".tsv":
            for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
                rows.append((row["sentence"].strip(), row["label"].strip()))
        else:
            for line in fh:
                text, _, label = line.rstrip("\n").rpartition("\t")
                if text.strip():
                    rows.append((text.strip(), label.strip()))
    return rows


async def send(url: str, rows: list[tuple[str, str]], feedback_share: float, rng: random.Random, concurrency: int = 8) -> list[str]:
    """Predict each row (one text per request), then post its true label for `feedback_share` of them."""
    ids: list[str | None] = [None] * len(rows)
    queue = list(range(len(rows)))
    async with httpx.AsyncClient(timeout=120) as client:
        async def worker() -> None:
            while queue:
                i = queue.pop(0)
                r = await client.post(f"{url}/predict", json={"texts": [rows[i][0]]})
                r.raise_for_status()
                ids[i] = r.json()[0]["request_id"]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        items = [{"request_id": ids[i], "label": rows[i][1]} for i in range(len(rows)) if rng.random() < feedback_share]
        if items:  # the feedback token of this home (the service generated it at startup, or DRIFTLOOP_FEEDBACK_TOKEN)
            from core import tokens  # noqa: PLC0415

            (await client.post(f"{url}/feedback", json={"items": items}, headers=tokens.authorization_header("feedback"))).raise_for_status()
    return ids


def embedding_false_alarms(engine, tag: str, windows: int, size: int) -> dict:
    """Stable windows only: how often each embedding test cries drift (MMD permutation vs Evidently default)."""
    import pandas as pd  # noqa: PLC0415
    from evidently import DataDefinition, Dataset, Report  # noqa: PLC0415
    from evidently.metrics import EmbeddingsDrift  # noqa: PLC0415

    from monitoring import stats, window  # noqa: PLC0415
    from monitoring.passes import reference_for  # noqa: PLC0415

    ref = reference_for(tag)
    stable = window.load(engine, tag, ref.label_names, last=None, up_to_id=3100)
    rng = np.random.default_rng(0)
    dims = [f"e{i}" for i in range(ref.embeddings.shape[1])]
    ref_frame = pd.DataFrame(ref.embeddings, columns=dims)
    ours, theirs, t_ours, t_theirs = 0, 0, 0.0, 0.0
    for w in range(windows):
        idx = rng.choice(len(stable.embeddings), size=size, replace=False)
        cur = stable.embeddings[idx]
        t0 = time.perf_counter()
        ours += stats.mmd_permutation_test(ref.embeddings, cur, permutations=2000, max_samples=400, seed=w)["p_value"] <= 0.01
        t_ours += time.perf_counter() - t0
        definition = DataDefinition(numerical_columns=dims, embeddings={"emb": dims})
        t0 = time.perf_counter()
        snap = Report([EmbeddingsDrift(embeddings_name="emb")]).run(
            Dataset.from_pandas(pd.DataFrame(cur, columns=dims), data_definition=definition),
            Dataset.from_pandas(ref_frame, data_definition=definition))
        t_theirs += time.perf_counter() - t0
        score = snap.dict()["metrics"][0]["value"]
        theirs += score > 0.55  # Evidently's default rule: domain classifier ROC AUC > 0.55
    return {"windows": windows, "window_size": size, "mmd_permutation_false_alarms": int(ours),
            "evidently_default_false_alarms": int(theirs), "mmd_seconds_per_window": round(t_ours / windows, 2),
            "evidently_seconds_per_window": round(t_theirs / windows, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--stable", type=int, default=3100)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--window", type=int, default=250)
    parser.add_argument("--feedback-share", type=float, default=0.5)
    parser.add_argument("--fa-windows", type=int, default=10)
    parser.add_argument("--analyse", metavar="HOME", help="Skip training and traffic: analyse a finished run's DRIFTLOOP_HOME.")
    args = parser.parse_args()
    data = Path(args.data)
    rng = random.Random(0)
    if args.analyse:
        saved = json.loads((Path(args.analyse) / "drift-passes.json").read_text())
        analyse(saved["tag"], saved["val_accuracy"], saved["passes"], saved["phase_sizes"], args)
        return

    sst2 = read_rows(data / "sst2" / "train.tsv")
    rng.shuffle(sst2)
    train_rows, stable_rows = sst2[:args.train_rows], sst2[args.train_rows:args.train_rows + args.stable]
    train_file = Path(os.environ["DRIFTLOOP_HOME"]) / "train.tsv"
    with open(train_file, "w", encoding="utf-8") as fh:
        fh.write("sentence\tlabel\n")
        fh.writelines(f"{t}\t{y}\n" for t, y in train_rows)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "driftloop", "train", "--data", str(train_file), "--epochs", "1", "--quiet", "--json",
                          "--promote", "always", "--set", "data.val_fraction=0.2", "--set", "report=false"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    trained = json.loads(out.stdout)
    tag = trained["model"]
    print(json.dumps({"model": tag, "train_rows": args.train_rows, "val_accuracy": trained["metrics"]["val"]["accuracy"],
                      "train_seconds": round(time.perf_counter() - t0, 1)}), flush=True)

    phases = [("sst2-stable", stable_rows), ("yelp", read_rows(data / "reviews" / "yelp_labelled.txt")),
              ("imdb", read_rows(data / "reviews" / "imdb_labelled.txt"))]
    stream = [(name, row) for name, rows in phases for row in rows]

    from core.statedb import get_engine  # noqa: PLC0415
    from monitoring.config import MonitorConfig  # noqa: PLC0415
    from monitoring.passes import monitor_once  # noqa: PLC0415

    engine = get_engine()
    config = MonitorConfig(window=args.window, min_samples=min(200, args.window), report=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "driftloop", "serve", "--port", str(port)], dict(os.environ), url)
    passes = []
    try:
        for s in range(0, len(stream), args.every):
            chunk = stream[s:s + args.every]
            asyncio.run(send(url, [row for _, row in chunk], args.feedback_share, rng))
            stored = monitor_once(engine, config, model_version=tag)
            q = stored.result.quality
            phase_mix = {}
            for name, _ in stream[max(0, s + len(chunk) - args.window):s + len(chunk)]:
                phase_mix[name] = phase_mix.get(name, 0) + 1
            p = {"after_requests": s + len(chunk), "window_phases": phase_mix, "drift": stored.result.drift,
                 "drifted_tests": [t.name for t in stored.result.tests if t.drift],
                 "estimated_accuracy": round(q.get("estimated_accuracy", float("nan")), 4),
                 "realized_accuracy": None if q.get("realized_accuracy") != q.get("realized_accuracy") else round(q["realized_accuracy"], 4),
                 "estimation_error": None if q.get("estimation_error") != q.get("estimation_error") else round(q["estimation_error"], 4),
                 "labelled": q.get("labelled"), "duration_s": round(stored.result.duration_s, 2)}
            passes.append(p)
            print(json.dumps(p), flush=True)
    finally:
        stop(proc)
    phase_sizes = [(name, len(rows)) for name, rows in phases]
    (Path(os.environ["DRIFTLOOP_HOME"]) / "drift-passes.json").write_text(json.dumps(
        {"tag": tag, "val_accuracy": trained["metrics"]["val"]["accuracy"], "passes": passes, "phase_sizes": phase_sizes}))
    analyse(tag, trained["metrics"]["val"]["accuracy"], passes, phase_sizes, args)


def analyse(tag: str, val_accuracy: float, passes: list[dict], phase_sizes: list, args) -> None:
    from core.statedb import get_engine  # noqa: PLC0415
    from monitoring.config import MonitorConfig  # noqa: PLC0415
    from monitoring.passes import monitor_once  # noqa: PLC0415

    engine = get_engine()
    # summary: false alarms on windows made only of stable traffic; delay after each switch
    summary = {"model": tag, "val_accuracy": val_accuracy}
    pure_stable = [p for p in passes if set(p["window_phases"]) == {"sst2-stable"}]
    summary["stable_windows"] = len(pure_stable)
    summary["false_alarms"] = sum(bool(p["drift"]) for p in pure_stable)
    start_of = {}
    pos = 0
    for name, size in phase_sizes:
        start_of[name] = pos
        pos += size
    for name in ("yelp", "imdb"):
        first = next((p for p in passes if p["after_requests"] > start_of[name] and p["drift"]), None)
        summary[f"{name}_detection_delay_requests"] = first["after_requests"] - start_of[name] if first else None
        summary[f"{name}_first_pass_after_switch_requests"] = next(p["after_requests"] for p in passes if p["after_requests"] > start_of[name]) - start_of[name]
        summary[f"{name}_windows_flagged"] = f"{sum(bool(p['drift']) for p in passes if set(p['window_phases']) == {name})}/" \
                                             f"{sum(1 for p in passes if set(p['window_phases']) == {name})}"
    errors = [abs(p["estimation_error"]) for p in passes if p["estimation_error"] is not None]
    summary["estimation_abs_error_mean"] = round(float(np.mean(errors)), 4)
    summary["estimation_abs_error_max"] = round(float(np.max(errors)), 4)
    for name in ("sst2-stable", "yelp", "imdb"):
        errs = [p["estimation_error"] for p in passes if set(p["window_phases"]) == {name} and p["estimation_error"] is not None]
        summary[f"estimation_error_mean_{name}"] = round(float(np.mean(errs)), 4) if errs else None

    summary["embedding_false_alarms"] = embedding_false_alarms(engine, tag, args.fa_windows, args.window)
    print(json.dumps({"embedding_false_alarms": summary["embedding_false_alarms"]}), flush=True)

    # pass duration at 1,000 and 5,000 rows, with and without the HTML report + workspace snapshot
    from monitoring import window as window_mod  # noqa: PLC0415
    from monitoring.analysis import run_pass  # noqa: PLC0415
    from monitoring.passes import reference_for  # noqa: PLC0415

    ref = reference_for(tag)
    durations = {}
    for size in (1000, 5000):
        win = window_mod.load(engine, tag, ref.label_names, last=size)
        t0 = time.perf_counter()
        run_pass(ref, win, MonitorConfig(window=size, report=False))
        tests_only = time.perf_counter() - t0
        t0 = time.perf_counter()
        monitor_once(engine, MonitorConfig(window=size, report=True), model_version=tag)
        full = time.perf_counter() - t0
        durations[size] = {"rows": win.size, "pass_seconds": round(tests_only, 2), "stored_with_report_seconds": round(full, 2)}
    summary["pass_duration"] = durations
    print("\nSUMMARY " + json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
