"""Serving throughput and latency: driftloop's BentoML service vs a naive server vs the offline ceiling.

In one run, against the same registered MiniLM model and the same single-text requests (SST-2 test
sentences), on loopback only, each load bounded in time and count:

  (a) driftloop's service (`driftloop serve`: adaptive batching, prediction log), and again with the
      prediction log off, to show what durability costs;
  (b) a naive server: the same model once per request, no batching (bench/naive_server.py);
  (c) the offline ceiling: the model's forward pass in this process at its best batch size.

    python bench/serve.py                         # concurrency 1, 8, 32, 64; 3 rounds of 15 s each
    python bench/serve.py --duration 30 --rounds 5 --concurrency 32 64
    python bench/serve.py --client python         # the asyncio client instead of wrk
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


def start(cmd: list[str], env: dict, url: str, timeout: float = 180) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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


def offline_ceiling(tag: str, texts: list[str], repeats: int = 2) -> dict:
    """The model in this process, no HTTP, best of `repeats`, over the first 512 texts of the traffic.

    `arrival`: texts taken in arrival order in gathered batches of B (what a server can see), each
    sorted by length into forward passes of F; best (B, F) with F in {16, B} (smaller F measured no better). `sorted`: all 512 texts known up front and
    sorted by length before batching, which no online server can do; reported for reference.
    """
    from finetune.registry import load_predictor  # noqa: PLC0415

    predictor = load_predictor(tag)
    sample = texts[:512]
    predictor.predict(sample[:64], batch_size=16)  # warm-up

    def rate(gathered: int, forward: int) -> float:
        t0 = time.perf_counter()
        for s in range(0, len(sample), gathered):
            predictor.predict(sample[s:s + gathered], batch_size=forward)
        return len(sample) / (time.perf_counter() - t0)

    arrival = max(((rate(b, f), b, f) for _ in range(repeats) for b in (16, 32, 64) for f in sorted({16, b})))
    ordered = max(((rate(len(sample), f), f) for _ in range(repeats) for f in (16, 32, 64)))
    return {"texts_per_s": round(arrival[0], 1), "gathered": arrival[1], "forward_batch": arrival[2],
            "sorted_texts_per_s": round(ordered[0], 1), "sorted_forward_batch": ordered[1]}


def batch_totals(url: str) -> tuple[float, float]:
    """(texts, calls) served by /predict since the server started, summed over workers, from /metrics."""
    totals = {"driftloop_batch_size_sum": 0.0, "driftloop_batch_size_count": 0.0}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals["driftloop_batch_size_sum"], totals["driftloop_batch_size_count"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per concurrency; the median is reported.")
    parser.add_argument("--model", default=None, help="A registered tag to serve (default: train a small one first).")
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
    results = {"model": tag, "offline_ceiling": offline_ceiling(tag, texts)}
    print(json.dumps({"offline_ceiling": results["offline_ceiling"]}), flush=True)

    # All servers run side by side (an idle one costs nothing) and the loads interleave, round by round,
    # so slow drifts of this noisy machine hit every variant alike; each cell is the median round.
    variants = [("driftloop", {}), ("driftloop, log off", {"DRIFTLOOP_SERVICE_LOG_PREDICTIONS": "false"}), ("naive", None)]
    procs, urls = [], {}
    try:
        for name, extra in variants:
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            if extra is None:
                cmd, penv = [sys.executable, str(ROOT / "bench" / "naive_server.py"), tag, str(port)], env
            else:
                cmd, penv = [*dl, "serve", "--port", str(port)], {**env, **extra}
            procs.append(start(cmd, penv, urls[name]))
        for c in args.concurrency:
            rounds: dict[str, list[dict]] = {name: [] for name, _ in variants}
            for _ in range(args.rounds):
                for name, extra in variants:
                    url = urls[name]
                    before = batch_totals(url) if extra is not None else None
                    r = load(url, texts, c, args.duration, bodies)
                    if before is not None:
                        after = batch_totals(url)
                        calls = after[1] - before[1]
                        r["mean_batch"] = round((after[0] - before[0]) / calls, 1) if calls else None
                    rounds[name].append(r)
                    print(json.dumps({"server": name, "concurrency": c, **r}), flush=True)
            for name, runs in rounds.items():
                median = sorted(runs, key=lambda r: r["req_per_s"])[len(runs) // 2]
                results.setdefault(name, {})[c] = {**median, "errors": sum(r["errors"] for r in runs)}
    finally:
        for proc in procs:
            stop(proc)

    ceiling = results["offline_ceiling"]["texts_per_s"]
    oc = results["offline_ceiling"]
    print(f"\nmodel {tag}; offline ceiling {ceiling} texts/s (arrival order, gathered {oc['gathered']}, forward {oc['forward_batch']}); "
          f"all-sorted {oc['sorted_texts_per_s']} texts/s (forward {oc['sorted_forward_batch']})\n")
    print("| server | concurrency | req/s | p50 ms | p99 ms | errors (all rounds) | mean batch | vs naive | vs ceiling | vs all-sorted |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, _ in variants:
        for c, r in results[name].items():
            naive = results["naive"][c]["req_per_s"]
            print(f"| {name} | {c} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r.get('mean_batch', 1)} | "
                  f"{r['req_per_s'] / naive:.2f}x | {r['req_per_s'] / ceiling:.0%} | {r['req_per_s'] / oc['sorted_texts_per_s']:.0%} |")
    for c in args.concurrency:
        on, off = results["driftloop"][c]["req_per_s"], results["driftloop, log off"][c]["req_per_s"]
        print(f"prediction log cost at concurrency {c}: {1 - on / off:+.1%} of throughput (median of {args.rounds} interleaved rounds)")


if __name__ == "__main__":
    main()
