"""Serving throughput and latency: driftloop's BentoML service vs a naive server vs the offline ceiling.

In one run, against the same registered MiniLM model and the same single-text requests (SST-2 test
sentences), on loopback only, each load bounded in time and count:

  (a) driftloop's service (`driftloop serve`: BentoML's adaptive batching, prediction log), again
      with the prediction log off, to show what the log costs, and again with an fsync per commit
      (synchronous=full);
  (b) a naive server: the same model on the same runtime (`--runtime`, default onnx) once per
      request, no batching (bench/naive_server.py);
  (c) the offline ceiling: the model's forward pass in this process at its best batch size; and,
      stricter, the most a zero-overhead server could do with the texts it can see at once at each
      concurrency, sorted by length into forward passes (see `offline_ceiling`).

    python bench/serve.py                         # concurrency 1, 8, 32, 64; 3 rounds of 15 s each
    python bench/serve.py --duration 30 --rounds 5 --concurrency 32 64
    python bench/serve.py --client python         # the asyncio client instead of wrk
    python bench/serve.py --runtimes torch onnx onnx-int8   # the serving runtimes side by side (core/runtimes.py)

With --runtimes, the variants are driftloop on each runtime (log on) and the naive server; the offline
ceiling is measured for each runtime, and each runtime's accuracy on the SST-2 test split is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DRIFTLOOP_HOME", tempfile.mkdtemp(prefix="driftloop-bench-serve-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sst2_sentences(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as fh:
        return [row["sentence"].strip() for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]


def launch(cmd: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def start(cmd: list[str], env: dict, url: str, timeout: float = 180) -> subprocess.Popen:
    return wait_ready(launch(cmd, env), cmd, url, timeout)


def wait_ready(proc: subprocess.Popen, cmd: list[str], url: str, timeout: float = 180) -> subprocess.Popen:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{cmd} not ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


async def _load(url: str, texts: list[str], concurrency: int, duration: float, max_requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        async def worker(i: int) -> None:
            nonlocal errors, sent
            j = i
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{url}/predict", json={"texts": [texts[j % len(texts)]]})
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok
                j += concurrency

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "req_per_s": round((len(lat) - errors) / elapsed, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "errors": errors}


def _wrk(url: str, bodies: Path, concurrency: int, duration: float) -> dict:
    """The same closed-loop load from wrk (C, one thread): the load generator takes far less of the
    2 shared cores than a Python client, so the server is measured rather than the client."""
    out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration))}s", "--timeout", "60s",
                          "-s", str(ROOT / "bench" / "wrk_predict.lua"), f"{url}/predict", "--", str(bodies)],
                         capture_output=True, text=True, check=True, timeout=duration + 120)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    errors = r["non200"] + r["socket_errors"]
    seconds = r["duration_us"] / 1e6
    return {"requests": r["requests"], "req_per_s": round((r["requests"] - r["non200"]) / seconds, 1),
            "p50_ms": round(r["p50_us"] / 1000, 1), "p99_ms": round(r["p99_us"] / 1000, 1), "errors": errors}


def load(url: str, texts: list[str], concurrency: int, duration: float, bodies: Path | None = None) -> dict:
    """Warm up, then measure; with `bodies` (a JSON-lines file of request bodies) through wrk."""
    if bodies is not None:
        _wrk(url, bodies, concurrency, min(2.0, duration / 5))  # warm-up, not reported
        return _wrk(url, bodies, concurrency, duration)
    asyncio.run(_load(url, texts, concurrency, min(2.0, duration / 5), 10_000))  # warm-up, not reported
    return asyncio.run(_load(url, texts, concurrency, duration, 100_000))


class OfflineCeiling:
    """The model in this process, no HTTP, over the first 512 texts of the traffic.

    `rate(B, F)`: texts taken in arrival order in gathered batches of B, each sorted by length into
    forward passes of F (F = B: one pass per batch, padded to its longest text). Cells are measured
    once per round, interleaved with the servers' loads, so the ceiling and the servers see the same
    spells of this noisy machine; each cell is the median of its rounds. For concurrency c:

    * `forward`: the issue's (c), "the model's forward pass in-process at its best batch size":
      best B of rate(B, B);
    * `window`: stricter: the most a server with no overhead at all could do with c clients, which
      never sees more than c texts at once: best F of rate(min(c, 64), F);
    * `best`: best F of rate(64, F), whatever the concurrency (the strictest).
    """

    FORWARD_BATCHES = (8, 16, 32, 64)  # a batch of 1 is never the best; it is measured as the window of 1 client

    def __init__(self, tag: str, texts: list[str], runtime: str = "torch"):
        from core.runtimes import load_runtime_predictor  # noqa: PLC0415 - after DRIFTLOOP_HOME is set above

        self.predictor = load_runtime_predictor(tag, runtime, int8_tolerance_pt=100)  # the runtime itself, gate aside
        self.sample = texts[:512]
        self.predictor.predict(self.sample[:64], batch_size=16)  # warm-up
        self.rounds: dict[tuple[int, int, int], list[float]] = {}

    @staticmethod
    def _window_cells(window: int) -> list[tuple[int, int]]:
        return [(window, f) for f in sorted({4, 8, 16, window}) if f <= window]

    def cells(self, concurrency: int) -> list[tuple[int, int]]:
        forward = [(b, b) for b in self.FORWARD_BATCHES]
        return sorted(set(forward + self._window_cells(min(concurrency, 64)) + self._window_cells(64)))

    def measure_round(self, concurrency: int) -> None:
        for gathered, forward in self.cells(concurrency):
            t0 = time.perf_counter()
            for s in range(0, len(self.sample), gathered):
                self.predictor.predict(self.sample[s:s + gathered], batch_size=forward)
            rate = len(self.sample) / (time.perf_counter() - t0)
            self.rounds.setdefault((concurrency, gathered, forward), []).append(rate)

    def summary(self, concurrency: int) -> dict:
        med = {(b, f): float(np.median(v)) for (c, b, f), v in self.rounds.items() if c == concurrency}
        forward = max((v, b) for (b, f), v in med.items() if b == f)
        window = max((v, f) for (b, f), v in med.items() if b == min(concurrency, 64))
        best = max((v, f) for (b, f), v in med.items() if b == 64)
        return {"forward": round(forward[0], 1), "forward_batch": forward[1],
                "window": round(window[0], 1), "window_forward_batch": window[1],
                "best": round(best[0], 1), "best_forward_batch": best[1],
                "cells": {f"{b}/{f}": round(v, 1) for (b, f), v in sorted(med.items())}}


BATCH_SUMS = ("driftloop_batch_size_sum", "driftloop_batch_size_count", "driftloop_batch_seconds_sum",
              "driftloop_prediction_log_write_seconds_sum")


def batch_totals(url: str) -> dict[str, float]:
    """The server's own /predict batch counters since it started, summed over workers, from /metrics."""
    totals = dict.fromkeys(BATCH_SUMS, 0.0)
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def batch_figures(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean batch, and the share of the batch thread's time spent committing the prediction log: what
    the log costs in throughput while the batch thread is the bottleneck, without the A/B noise."""
    delta = {k: after[k] - before[k] for k in BATCH_SUMS}
    calls, busy = delta["driftloop_batch_size_count"], delta["driftloop_batch_seconds_sum"]
    return {"mean_batch": round(delta["driftloop_batch_size_sum"] / calls, 1) if calls else None,
            "log_share": round(delta["driftloop_prediction_log_write_seconds_sum"] / busy, 4) if busy else None}


def runtime_accuracy(ceilings: dict, test_tsv: Path) -> dict:
    """Each runtime's accuracy on the labelled SST-2 test split (the same texts for all)."""
    with open(test_tsv, encoding="utf-8") as fh:
        rows = [(r["sentence"].strip(), r["label"].strip()) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
    out = {}
    for runtime, each in ceilings.items():
        p = each.predictor
        pred = p.predict([t for t, _ in rows], batch_size=32)
        names = [p.label_names[i] for i in pred.labels]
        out[runtime] = round(float(np.mean([n == y for n, y in zip(names, [y for _, y in rows])])), 4)
    return out


def print_runtimes(results: dict, runtimes: list[str], args) -> None:
    first = runtimes[0]
    print(f"\nmodel {results['model']}; SST-2 test accuracy: " + ", ".join(f"{r} {a}" for r, a in results["accuracy"].items()))
    print("\n| runtime | offline ceiling (texts/s, best batch) | vs " + first + " |")
    print("|---|---|---|")
    c0 = args.concurrency[0]
    for r in runtimes:
        oc, base = results["runtime_ceilings"][r][c0], results["runtime_ceilings"][first][c0]
        print(f"| {r} | {oc['forward']} (batch {oc['forward_batch']}) | {oc['forward'] / base['forward']:.2f}x |")
    print("\n| server | concurrency | req/s | p50 ms | p99 ms | errors | mean batch | vs naive | vs " + first + " served | vs own ceiling |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        for name in [f"driftloop {r}" for r in runtimes] + ["naive"]:
            r = results[name][c]
            runtime = name.split(" ", 1)[1] if name != "naive" else first
            own = results["runtime_ceilings"][runtime][c]["forward"]
            print(f"| {name} | {c} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r.get('mean_batch', 1)} | "
                  f"{r['req_per_s'] / results['naive'][c]['req_per_s']:.2f}x | "
                  f"{r['req_per_s'] / results[f'driftloop {first}'][c]['req_per_s']:.2f}x | {r['req_per_s'] / own:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per concurrency; the median is reported.")
    parser.add_argument("--model", default=None, help="A registered tag to serve (default: train a small one first).")
    parser.add_argument("--runtime", choices=["torch", "onnx", "onnx-int8"], default="onnx",
                        help="The runtime of every variant, the naive server's included (default: the service's default, onnx).")
    parser.add_argument("--runtimes", nargs="+", choices=["torch", "onnx", "onnx-int8"], default=None,
                        help="Compare these serving runtimes (ceilings, accuracy, served req/s) instead of the default variants.")
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto",
                        help="Load generator: wrk (Debian package) when installed, else the asyncio client.")
    args = parser.parse_args()
    texts = sst2_sentences(Path(args.data) / "test.tsv")
    bodies = None
    if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")):
        if not shutil.which("wrk"):
            raise SystemExit("error: wrk is not installed (apt-get install wrk), or use --client python")
        bodies = Path(os.environ["DRIFTLOOP_HOME"]) / "bodies.jsonl"
        bodies.write_text("".join(json.dumps({"texts": [t]}) + "\n" for t in texts), encoding="utf-8")
    print(json.dumps({"client": "wrk" if bodies else "python asyncio (httpx)"}), flush=True)
    env = {**os.environ}
    dl = [sys.executable, "-m", "driftloop"]
    tag = args.model
    if tag is None:
        out = subprocess.run([*dl, "train", "--data", f"{args.data}/train.tsv", "--max-rows", "500", "--epochs", "1",
                              "--quiet", "--json", "--promote", "always", "--set", "report=false"],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        tag = json.loads(out.stdout)["model"]
    runtimes = args.runtimes or [args.runtime]
    ceilings = {r: OfflineCeiling(tag, texts, r) for r in runtimes}
    ceiling = ceilings[runtimes[0]]
    results: dict = {"model": tag, "offline_ceiling": {}, "runtime_ceilings": {r: {} for r in runtimes}}
    if args.runtimes:
        results["accuracy"] = runtime_accuracy(ceilings, Path(args.data) / "test.tsv")
        print(json.dumps({"sst2_test_accuracy": results["accuracy"]}), flush=True)

    # All servers run side by side (an idle one costs nothing) and the loads interleave, round by round,
    # so slow drifts of this noisy machine hit every variant alike; each cell is the median round.
    if args.runtimes:
        variants = [(f"driftloop {r}", {"DRIFTLOOP_SERVICE_RUNTIME": r, "DRIFTLOOP_SERVICE_INT8_TOLERANCE_PT": "100"})
                    for r in runtimes] + [("naive", None)]
    else:
        same = {"DRIFTLOOP_SERVICE_RUNTIME": args.runtime, "DRIFTLOOP_SERVICE_INT8_TOLERANCE_PT": "100"}
        variants = [("driftloop", same), ("driftloop, log off", {**same, "DRIFTLOOP_SERVICE_LOG_PREDICTIONS": "false"}),
                    ("driftloop, commit fsync (synchronous=full)", {**same, "DRIFTLOOP_DB_SYNCHRONOUS": "full"}), ("naive", None)]
    procs, urls, cmds = [], {}, {}
    try:
        for name, extra in variants:  # all launched at once (their start-ups overlap), then each awaited
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            if extra is None:
                cmd, penv = [sys.executable, str(ROOT / "bench" / "naive_server.py"), tag, str(port), runtimes[0]], env
            else:
                cmd, penv = [*dl, "serve", "--port", str(port)], {**env, **extra}
            procs.append(launch(cmd, penv))
            cmds[name] = cmd
        for (name, _), proc in zip(variants, procs):
            wait_ready(proc, cmds[name], urls[name])
        print(json.dumps({"servers_ready": len(procs)}), flush=True)
        for c in args.concurrency:
            rounds: dict[str, list[dict]] = {name: [] for name, _ in variants}
            for _ in range(args.rounds):
                for each in ceilings.values():
                    each.measure_round(c)
                for name, extra in variants:
                    url = urls[name]
                    before = batch_totals(url) if extra is not None else None
                    r = load(url, texts, c, args.duration, bodies)
                    if before is not None:
                        r.update(batch_figures(before, batch_totals(url)))
                    rounds[name].append(r)
                    print(json.dumps({"server": name, "concurrency": c, **r}), flush=True)
            for name, runs in rounds.items():
                median = sorted(runs, key=lambda r: r["req_per_s"])[len(runs) // 2]
                results.setdefault(name, {})[c] = {**median, "errors": sum(r["errors"] for r in runs)}
            results["offline_ceiling"][c] = ceiling.summary(c)
            for r, each in ceilings.items():
                results["runtime_ceilings"][r][c] = each.summary(c)
                print(json.dumps({"offline_ceiling": c, "runtime": r, **results["runtime_ceilings"][r][c]}), flush=True)
    finally:
        for proc in procs:
            stop(proc)

    print(f"\nmodel {tag}; offline ceilings in texts/s, median of {args.rounds} rounds interleaved with the loads:")
    for c, oc in results["offline_ceiling"].items():
        print(f"* concurrency {c}: (c) forward pass at its best batch size {oc['forward']} (batch {oc['forward_batch']}); "
              f"window of {min(c, 64)} texts {oc['window']} (forward passes of {oc['window_forward_batch']}); "
              f"best window (64 texts) {oc['best']} (forward passes of {oc['best_forward_batch']})")
    print("\n| server | concurrency | req/s | p50 ms | p99 ms | errors (all rounds) | mean batch | vs naive | vs (c) | vs window | vs best window |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, _ in variants:
        for c, r in results[name].items():
            naive, oc = results["naive"][c]["req_per_s"], results["offline_ceiling"][c]
            print(f"| {name} | {c} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r.get('mean_batch', 1)} | "
                  f"{r['req_per_s'] / naive:.2f}x | {r['req_per_s'] / oc['forward']:.0%} | {r['req_per_s'] / oc['window']:.0%} | "
                  f"{r['req_per_s'] / oc['best']:.0%} |")
    if args.runtimes:
        print_runtimes(results, runtimes, args)
        return
    for c in args.concurrency:
        on, off = results["driftloop"][c]["req_per_s"], results["driftloop, log off"][c]["req_per_s"]
        share = results["driftloop"][c].get("log_share")
        print(f"prediction log cost at concurrency {c}: {1 - on / off:+.1%} of throughput, log on vs off (median of {args.rounds} "
              f"interleaved rounds); commits took {share:.1%} of the batch thread's time (median round)")


if __name__ == "__main__":
    main()
