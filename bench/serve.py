"""Serving throughput and latency: driftloop's BentoML service vs a naive server vs the offline ceiling.

In one run, against the same registered MiniLM model and the same single-text requests (SST-2 test
sentences), on loopback only, each load bounded in time and count:

  (a) driftloop's service (`driftloop serve`: adaptive batching, prediction log), and again with the
      prediction log off, to show what durability costs;
  (b) a naive server: the same model once per request, no batching (bench/naive_server.py);
  (c) the offline ceiling: the model's forward pass in this process at its best batch size.

    python bench/serve.py                         # concurrency 1, 8, 32, 64; 15 s each
    python bench/serve.py --duration 30 --concurrency 32 64
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
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


def load(url: str, texts: list[str], concurrency: int, duration: float) -> dict:
    asyncio.run(_load(url, texts, concurrency, min(2.0, duration / 5), 10_000))  # warm-up, not reported
    return asyncio.run(_load(url, texts, concurrency, duration, 100_000))


def offline_ceiling(tag: str, texts: list[str]) -> dict:
    from finetune.registry import load_predictor  # noqa: PLC0415

    predictor = load_predictor(tag)
    best = {}
    for batch in (8, 16, 32, 64):
        predictor.predict(texts[:batch], batch_size=batch)
        t0 = time.perf_counter()
        predictor.predict(texts[:512], batch_size=batch)
        rate = 512 / (time.perf_counter() - t0)
        if rate > best.get("texts_per_s", 0):
            best = {"batch_size": batch, "texts_per_s": round(rate, 1)}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--model", default=None, help="A registered tag to serve (default: train a small one first).")
    args = parser.parse_args()
    texts = sst2_sentences(Path(args.data) / "test.tsv")
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

    variants = [("driftloop", {}), ("driftloop, log off", {"DRIFTLOOP_SERVICE_LOG_PREDICTIONS": "false"}), ("naive", None)]
    for name, extra in variants:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        if extra is None:
            proc = start([sys.executable, str(ROOT / "bench" / "naive_server.py"), tag, str(port)], env, url)
        else:
            proc = start([*dl, "serve", "--port", str(port)], {**env, **extra}, url)
        try:
            for c in args.concurrency:
                r = load(url, texts, c, args.duration)
                results.setdefault(name, {})[c] = r
                print(json.dumps({"server": name, "concurrency": c, **r}), flush=True)
        finally:
            stop(proc)

    ceiling = results["offline_ceiling"]["texts_per_s"]
    print(f"\nmodel {tag}; offline ceiling {ceiling} texts/s at batch {results['offline_ceiling']['batch_size']}\n")
    print("| server | concurrency | req/s | p50 ms | p99 ms | errors | vs naive | vs ceiling |")
    print("|---|---|---|---|---|---|---|---|")
    for name, _ in variants:
        for c, r in results[name].items():
            naive = results["naive"][c]["req_per_s"]
            print(f"| {name} | {c} | {r['req_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | "
                  f"{r['req_per_s'] / naive:.2f}x | {r['req_per_s'] / ceiling:.0%} |")
    for c in args.concurrency:
        on, off = results["driftloop"][c]["req_per_s"], results["driftloop, log off"][c]["req_per_s"]
        print(f"prediction log cost at concurrency {c}: {1 - on / off:+.1%} of throughput")


if __name__ == "__main__":
    main()
