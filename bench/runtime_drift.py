"""Does a serving runtime read as drift? The monitor over stable traffic served by each runtime.

A MiniLM classifier is fine-tuned on SST-2 train rows (its validation split is the reference
profile). For each runtime (torch, onnx, onnx-int8), the real service (`driftloop serve --runtime`)
answers the same `--requests` stable requests (disjoint SST-2 train rows: the reference's own
distribution), one text each, on loopback; then one monitor pass tests that window (all of it served
by that runtime) against:

  * the reference profiled with the runtime that served it (what driftloop does: core/runtimes.py
    `reference_profile`), and
  * the reference profiled with PyTorch at registration (what a monitor unaware of the runtime does).

A verdict on stable traffic is a false alarm (each pass has family-wise alpha = 0.01). The issue's
target: no drift verdict over 1,000 stable requests served by onnx-int8.

    python bench/runtime_drift.py                 # ~4 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import asyncio
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
os.environ.setdefault("DRIFTLOOP_HOME", tempfile.mkdtemp(prefix="driftloop-bench-runtime-drift-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from drift import read_rows, send  # noqa: E402
from scipy.stats import ks_2samp  # noqa: E402
from serve import free_port, start, stop  # noqa: E402

from core.home import configure_environment  # noqa: E402

configure_environment()

from core.statedb import get_engine  # noqa: E402
from monitoring import window  # noqa: E402
from monitoring.analysis import Reference, run_pass  # noqa: E402
from monitoring.config import MonitorConfig  # noqa: E402
from monitoring.passes import monitor_once  # noqa: E402


def smallest(result) -> str:
    test = min(result.tests, key=lambda t: t.p_value)
    return f"{test.name} p={test.p_value:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--runtimes", nargs="+", default=["torch", "onnx", "onnx-int8"])
    args = parser.parse_args()
    sst2 = read_rows(Path(args.data) / "sst2" / "train.tsv")
    random.Random(0).shuffle(sst2)
    train_rows, stable = sst2[:args.train_rows], sst2[args.train_rows:args.train_rows + args.requests]
    train_file = Path(os.environ["DRIFTLOOP_HOME"]) / "train.tsv"
    with open(train_file, "w", encoding="utf-8") as fh:
        fh.write("sentence\tlabel\n")
        fh.writelines(f"{t}\t{y}\n" for t, y in train_rows)
    out = subprocess.run([sys.executable, "-m", "driftloop", "train", "--data", str(train_file), "--epochs", "1", "--quiet", "--json",
                          "--promote", "always", "--set", "data.val_fraction=0.2", "--set", "report=false"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    tag = json.loads(out.stdout)["model"]
    print(json.dumps({"model": tag, "train_rows": args.train_rows, "stable_requests": len(stable)}), flush=True)

    engine = get_engine()
    config = MonitorConfig(window=len(stable), report=False)
    rows = []
    for runtime in args.runtimes:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "DRIFTLOOP_SERVICE_RUNTIME": runtime, "DRIFTLOOP_SERVICE_INT8_TOLERANCE_PT": "100"}
        proc = start([sys.executable, "-m", "driftloop", "serve", "--port", str(port)], env, url, timeout=600)
        try:
            t0 = time.perf_counter()
            asyncio.run(send(url, stable, 0.0, random.Random(1)))
            seconds = time.perf_counter() - t0
        finally:
            stop(proc)
        stored = monitor_once(engine, config, model_version=tag)  # the window of this runtime's requests
        win = window.load(engine, tag, Reference.load(tag).label_names, last=len(stable))
        against_torch = run_pass(Reference.load(tag, "torch"), win, config)
        row = {"runtime": runtime, "window": stored.result.window_size, "window_runtime": win.runtime,
               "reference_runtime": stored.result.reference["runtime"], "drift": stored.result.drift,
               "smallest_p": smallest(stored.result),
               "drift_vs_torch_reference": against_torch.drift, "smallest_p_vs_torch_reference": smallest(against_torch),
               "send_seconds": round(seconds, 1)}
        own, ref_torch = Reference.load(tag, win.runtime).frame, Reference.load(tag, "torch").frame
        shift = np.abs(own["confidence"].to_numpy() - ref_torch["confidence"].to_numpy())
        row.update({"reference_confidence_shift_mean": round(float(shift.mean()), 5),
                    "reference_confidence_shift_max": round(float(shift.max()), 5),
                    "reference_ks_vs_torch_p": round(float(ks_2samp(own["confidence"], ref_torch["confidence"]).pvalue), 4)})
        rows.append(row)
        print(json.dumps(row), flush=True)

    print(f"\nmodel {tag}; {len(stable)} stable SST-2 requests per runtime, one monitor pass each (alpha 0.01, Holm):\n")
    print("| served by | reference profiled with the serving runtime | reference profiled with PyTorch | "
          "its reference vs PyTorch's, same texts: mean / max abs confidence change |")
    print("|---|---|---|---|")
    for r in rows:
        verdict = lambda d: "**drift**" if d else "no drift"  # noqa: E731
        print(f"| {r['runtime']} | {verdict(r['drift'])} ({r['smallest_p']}) | "
              f"{verdict(r['drift_vs_torch_reference'])} ({r['smallest_p_vs_torch_reference']}) | "
              f"{r['reference_confidence_shift_mean']} / {r['reference_confidence_shift_max']} |")


if __name__ == "__main__":
    main()
