"""Soak: minutes of sustained load at high concurrency against the real service (issue 6's load test).

`driftloop serve` on a registered MiniLM model, single-text SST-2 test requests from N concurrent
clients on loopback, for a bounded duration (and count). Every window of W seconds reports req/s,
p50/p99, errors and the server's resident memory (supervisor + workers, psutil). Goals: 0 errors,
RSS growth < 10 % from the end of the warm-up to the end, every acknowledged prediction in the log.
The baseline for the ratios is the same run's first window after warm-up.

    python bench/soak.py                               # 5 minutes at 64 clients (the issue's figure)
    python bench/soak.py --minutes 1 --concurrency 32  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DRIFTLOOP_HOME", tempfile.mkdtemp(prefix="driftloop-bench-soak-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from serve import free_port, sst2_sentences, start, stop  # noqa: E402  (bench/serve.py: same server start/stop)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MiB."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


async def soak(url: str, texts: list[str], pid: int, concurrency: int, seconds: float, window_s: float,
               max_requests: int, say) -> tuple[list[dict], list[str]]:
    """Closed-loop clients until `seconds` or `max_requests`; one summary per window; returns (windows, acknowledged ids)."""
    windows: list[dict] = []
    acked: list[str] = []
    current = {"lat": [], "errors": 0}
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        async def worker(i: int) -> None:
            nonlocal sent
            j = i
            while time.perf_counter() < deadline and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post(f"{url}/predict", json={"texts": [texts[j % len(texts)]]})
                    if r.status_code == 200:
                        acked.append(r.json()[0]["request_id"])
                    else:
                        current["errors"] += 1
                except httpx.HTTPError:
                    current["errors"] += 1
                current["lat"].append(time.perf_counter() - t0)
                j += concurrency

        async def sampler() -> None:
            t_last = time.perf_counter()
            while time.perf_counter() < deadline and sent < max_requests:
                await asyncio.sleep(window_s)
                now = time.perf_counter()
                lat, errors = np.asarray(current["lat"]) * 1000, current["errors"]
                current["lat"], current["errors"] = [], 0
                w = {"t_s": round(now - started), "req_per_s": round((len(lat) - errors) / (now - t_last), 1),
                     "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
                     "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
                     "errors": errors, "rss_mb": round(tree_rss_mb(pid), 1)}
                windows.append(w)
                say(json.dumps(w))
                t_last = now

        await asyncio.gather(sampler(), *(worker(i) for i in range(concurrency)))
    return windows, acked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--window", type=float, default=15.0, help="Seconds per reported window.")
    parser.add_argument("--warmup", type=float, default=30.0, help="Seconds of load before the RSS baseline is taken.")
    parser.add_argument("--max-requests", type=int, default=200_000, help="Bound on the request count.")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--model", default=None, help="A registered tag to serve (default: train a small one first).")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    texts = sst2_sentences(Path(args.data) / "test.tsv")
    env = {**os.environ}
    tag = args.model
    if tag is None:
        out = subprocess.run([sys.executable, "-m", "driftloop", "train", "--data", f"{args.data}/train.tsv", "--max-rows", "500",
                              "--epochs", "1", "--quiet", "--json", "--promote", "always", "--set", "report=false"],
                             cwd=ROOT, env=env, capture_output=True, text=True, check=True)
        tag = json.loads(out.stdout)["model"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "driftloop", "serve", "--port", str(port), "--workers", str(args.workers)], env, url)
    try:
        rss_start = tree_rss_mb(proc.pid)
        windows, acked = asyncio.run(soak(url, texts, proc.pid, args.concurrency, args.warmup + args.minutes * 60, args.window,
                                          args.max_requests, say))
    finally:
        stop(proc)

    from core import predlog  # noqa: PLC0415
    from core.statedb import get_engine  # noqa: PLC0415

    logged = predlog.request_ids(get_engine())
    measured = [w for w in windows if w["t_s"] > args.warmup] or windows
    base, last = measured[0], measured[-1]
    summary = {
        "model": tag, "concurrency": args.concurrency, "workers": args.workers, "seconds": windows[-1]["t_s"] if windows else 0,
        "requests_acknowledged": len(acked), "errors": sum(w["errors"] for w in windows),
        "req_per_s_mean": round(float(np.mean([w["req_per_s"] for w in measured])), 1),
        "req_per_s_last_vs_first": round(last["req_per_s"] / base["req_per_s"], 3) if base["req_per_s"] else None,
        "p99_ms_worst_window": max((w["p99_ms"] or 0) for w in measured),
        "rss_mb_idle": round(rss_start, 1), "rss_mb_after_warmup": base["rss_mb"], "rss_mb_end": last["rss_mb"],
        "rss_growth": round(last["rss_mb"] / base["rss_mb"] - 1, 4) if base["rss_mb"] else None,
        "acknowledged_missing_from_log": len(set(acked) - logged), "duplicate_acks": len(acked) - len(set(acked)),
    }
    if args.json:
        print(json.dumps({"summary": summary, "windows": windows}))
    else:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
