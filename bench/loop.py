"""The closed loop on real data, through the real service and controller, with the default policy.

A champion is fine-tuned on SST-2 train rows; for each scenario (a fresh copy of its home) the
service and controller start, stable traffic of disjoint SST-2 rows flows first, then the shifted
traffic with feedback for a share of it. Scenarios: yelp and imdb (benign: the champion stays about
as accurate; goal: drift reported, nothing promoted) and financial news (harmful; goal: retrain,
promote, ≥ +8 points on held-out finance, ≤ 1 point lost on SST-2 test, ≤ 10 min shift → promotion).

    python bench/loop.py                                   # all three scenarios, ~25 min on 2 cores
    python bench/loop.py --scenario finance --json
    python bench/loop.py --shift-data my_domain.tsv        # any labelled file the trainer reads
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
BASE_HOME = Path(os.environ.get("DRIFTLOOP_HOME") or tempfile.mkdtemp(prefix="driftloop-bench-loop-"))
os.environ["DRIFTLOOP_HOME"] = str(BASE_HOME / "champion")
os.environ.pop("BENTOML_HOME", None)
os.environ.pop("DRIFTLOOP_DB_URL", None)

import httpx  # noqa: E402

CONTROLLER_SETS: list[str] = []

from monitoring.demo import Proc, _accuracy, _free_port, _write_tsv  # noqa: E402
from monitoring.replay import labelled_rows, replay  # noqa: E402


def _use_home(home: Path) -> None:
    """Point this process (and the children it starts) at `home`, dropping cached DB engines."""
    from finetune.statedb import dispose_engines  # noqa: PLC0415

    os.environ["DRIFTLOOP_HOME"] = str(home)
    dispose_engines()


def scenario(name: str, champion_home: Path, champion: str, stable: list, shift: list, shift_held: list, sst2_test: list,
             feedback: float, timeout_s: float, say) -> dict:
    home = BASE_HOME / f"run-{name}"
    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(champion_home, home, symlinks=True)
    _use_home(home)
    env = {**os.environ, "DRIFTLOOP_SERVICE_RELOAD_INTERVAL_S": "1"}
    port, cport = _free_port(), _free_port()
    url, curl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{cport}"
    service = Proc(["serve", "--port", str(port)], env, home / "service.log")
    controller = None
    from finetune import alias  # noqa: PLC0415
    from finetune.statedb import get_engine  # noqa: PLC0415
    from monitoring import audit, store  # noqa: PLC0415

    try:
        service.wait_http(f"{url}/readyz")
        sets = [x for item in CONTROLLER_SETS for x in ("--set", item)]
        controller = Proc(["controller", "--port", str(cport), "--monitor-interval", "5", "--window", "250", "--min-samples", "200",
                           *sets], env, home / "controller.log")
        controller.wait_http(f"{curl}/healthz")
        engine = get_engine()
        say(f"[{name}] stable: {len(stable)} SST-2 rows, feedback {feedback:.0%}")
        st = replay(url, stable, concurrency=8, feedback_fraction=feedback, seed=1)
        time.sleep(12)  # let the controller pass over the last stable window
        retrains_stable = len(audit.history(engine, limit=500, kinds=("retrain_started",)))
        store.ensure_schema(engine)
        first_shift_id = (store.latest(engine) or {}).get("window_last_id") or 0
        say(f"[{name}] shift: {len(shift)} rows, feedback {feedback:.0%}; retrains so far {retrains_stable}")
        t_shift = time.perf_counter()
        sh = replay(url, shift, concurrency=8, feedback_fraction=feedback, seed=2)
        # wait for the loop to settle: a promotion, a rejected challenger, or the timeout
        deadline = time.time() + timeout_s
        promoted, seconds = None, None
        while time.time() < deadline:
            state = alias.current(engine=engine)
            if state is not None and state.tag != champion:
                promoted, seconds = state.tag, round(time.perf_counter() - t_shift, 1)
                break
            done = audit.history(engine, limit=5, kinds=("retrain_succeeded", "retrain_failed"))
            if done and not done[0].get("promoted"):
                break
            if time.perf_counter() - t_shift > 120 and not audit.history(engine, limit=1, kinds=("retrain_started",)) \
                    and store.consecutive_drift(engine, champion) >= 3:
                break  # drift reported for minutes, policy declined: the benign outcome
            time.sleep(2)
        alarm = next((r for r in reversed(store.recent(engine, limit=200, model_version=champion))
                      if r["drift"] and (r["window_last_id"] or 0) > first_shift_id), None)
        requests_to_alarm = (alarm["window_last_id"] - first_shift_id) if alarm else None
        gates = audit.history(engine, limit=10, kinds=("gate",))
        served = None
        if promoted:  # every worker polls the alias each second: wait for the hot swap
            swap_deadline = time.time() + 60
            while time.time() < swap_deadline and served != promoted:
                r = httpx.post(f"{url}/predict", json={"texts": [shift[0][0]]}, timeout=30)
                served = r.json()[0]["model_version"] if r.status_code == 200 else None
                time.sleep(0.5)
    finally:
        if controller is not None:
            controller.stop()
        service.stop()
    new = promoted or champion
    result = {
        "scenario": name, "retrains_during_stable": retrains_stable, "requests_shift_to_alarm": requests_to_alarm,
        "retrains_after_shift": len(audit.history(engine, limit=500, kinds=("retrain_started",))) - retrains_stable,
        "promotions": len(audit.history(engine, limit=500, kinds=("promotion",))), "seconds_shift_to_promotion": seconds,
        "gate": [{k: g.get(k) for k in ("passed", "reasons", "champion_fresh_accuracy", "challenger_fresh_accuracy", "fresh_n", "p_value",
                                        "regression_loss")} for g in gates],
        "served_version_changed": bool(promoted and served == promoted), "failed_requests": st.errors + sh.errors,
        "champion_accuracy_on_shift_traffic": sh.to_json()["accuracy"],
        "shifted_accuracy_before": _accuracy(champion, shift_held), "shifted_accuracy_after": _accuracy(new, shift_held),
        "source_accuracy_before": _accuracy(champion, sst2_test), "source_accuracy_after": _accuracy(new, sst2_test),
        "last_policy": (audit.last(engine, "policy") or {}).get("reason"),
    }
    say(f"[{name}] " + json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--scenario", choices=["yelp", "imdb", "finance", "all"], default="all")
    parser.add_argument("--shift-data", help="A labelled file to use as the (only) shifted traffic.")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--stable", type=int, default=1000)
    parser.add_argument("--shift-traffic", type=int, default=1000, help="Shifted requests (the rest of the file is held out).")
    parser.add_argument("--feedback", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="Controller config, e.g. refine.replay_ratio=2.")
    args = parser.parse_args()
    CONTROLLER_SETS.extend(args.sets)
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    data = Path(args.data)
    rng = random.Random(0)
    sst2 = labelled_rows(str(data / "sst2" / "train.tsv"))
    rng.shuffle(sst2)
    sst2_test = labelled_rows(str(data / "sst2" / "test.tsv"))
    champion_home = BASE_HOME / "champion"
    champion_home.mkdir(parents=True, exist_ok=True)
    _write_tsv(champion_home / "train.tsv", sst2[:args.train_rows])
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "driftloop", "train", "--data", str(champion_home / "train.tsv"), "--epochs", "1", "--quiet",
                          "--json", "--promote", "always", "--set", "data.val_fraction=0.2", "--set", "report=false"],
                         cwd=ROOT, env={**os.environ, "DRIFTLOOP_HOME": str(champion_home)}, capture_output=True, text=True, check=True)
    champion = json.loads(out.stdout)["model"]
    say(f"champion {champion} trained in {time.perf_counter() - t0:.0f}s")
    stable = sst2[args.train_rows:args.train_rows + args.stable]
    shifts = {}
    if args.shift_data:
        shifts["custom"] = labelled_rows(args.shift_data)
    else:
        names = ["yelp", "imdb", "finance"] if args.scenario == "all" else [args.scenario]
        files = {"yelp": "reviews/yelp_labelled.txt", "imdb": "reviews/imdb_labelled.txt", "finance": "finance/fpb_labelled.txt"}
        shifts = {n: labelled_rows(str(data / files[n])) for n in names}
    results = []
    for name, rows in shifts.items():
        random.Random(1).shuffle(rows)
        n = min(args.shift_traffic, len(rows) * 2 // 3)
        results.append(scenario(name, champion_home, champion, stable, rows[:n], rows[n:], sst2_test, args.feedback, args.timeout, say))
    summary = {"champion": champion, "scenarios": results}
    if args.json:
        print(json.dumps(summary))
    else:
        print("\n| scenario | retrains (stable) | requests to alarm | retrains after shift | promotions | s to promotion | shifted acc before → after | SST-2 test before → after |")
        print("|---|---|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['scenario']} | {r['retrains_during_stable']} | {r['requests_shift_to_alarm']} | {r['retrains_after_shift']} | {r['promotions']} | "
                  f"{r['seconds_shift_to_promotion']} | {r['shifted_accuracy_before']} → {r['shifted_accuracy_after']} | "
                  f"{r['source_accuracy_before']} → {r['source_accuracy_after']} |")


if __name__ == "__main__":
    main()
