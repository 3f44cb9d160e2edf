"""The closed loop on real data, through the real service and controller, with the default policy.

A champion is fine-tuned on SST-2 train rows (3000 rows, 1 epoch). Every shifted domain is shuffled
and split: up to --shift-traffic rows (at most 2/3 of the file) may be sent, the rest is held out and
never sent; SST-2's held-out rows are test.tsv. Feedback (the true label) comes for a share of the
requests. Three modes:

Scenarios (default): each scenario runs on a fresh copy of the champion's home: stable traffic of
disjoint SST-2 rows, then the shifted traffic. yelp and imdb are benign (the champion stays about as
accurate; goal: drift reported, nothing promoted), financial news is harmful (goal: retrain, promote,
≥ +8 points on held-out finance, ≤ 1 point lost on SST-2 test, ≤ 10 min shift → promotion).

Sequence (--sequence): ONE service and ONE controller on one home go through phases in order, after a
stable phase of SST-2 rows: finance, imdb, yelp (traffic of that domain), sst2 (SST-2 returns: more
disjoint SST-2 rows) and retrain (`driftloop retrain --json`, forced: generation N+1 even when the
policy would not act; the champion's labelled traffic is topped up first when it has too little).
After each phase's traffic the script waits for the loop to settle: a promotion served by the service
(low-rate traffic keeps flowing while a refinement runs, so the hot swap happens under load), a
refinement that ended without one, or --settle seconds with nothing running. One JSON line per phase
(serving model and generation, requests, failed requests, retrains, promotions, rollbacks, drift
verdicts, last policy reason, held-out accuracy on every domain seen so far before and after, the
serving model's data lineage), then a table and PASS/FAIL targets: finance promoted with ≥ +20 points
on held-out finance and ≤ 1 point lost on SST-2 test; no retrain in imdb and sst2; the generation-2
model replays rows of generations 0 and 1, stays within 1 point of generation 1 on every seen domain
and was gated on a regression suite of ≥ 300 items; 0 failed requests. The forced retrain uses the
default refine settings (`driftloop retrain` does not take the controller's --set).

Simulated day (--simulate-hours H): one service and controller, --requests requests split into H
"hours" whose domain mix follows a 24-hour template: 0-5 SST-2, 6-9 finance ramping 25 → 100 %,
10-13 finance, 14-17 imdb + yelp (benign), 18-23 SST-2 with 20 % finance (with H ≠ 24, hour h takes
the template at its midpoint, (h + 0.5) · 24 / H). Rows are drawn with replacement from each
domain's traffic rows; feedback is late (after each chunk of --chunk requests, plus --feedback-delay).
Reports requests, retrains, promotions, rollbacks, false alarms per 10,000 stable requests (defined
in the output), failed requests and acknowledged rows missing from the prediction log, one line per
hour and held-out accuracy per domain at the end.

    python bench/loop.py                                   # all three scenarios, ~25 min on 2 cores
    python bench/loop.py --scenario finance --json
    python bench/loop.py --shift-data my_domain.tsv        # any labelled file the trainer reads
    python bench/loop.py --sequence finance,imdb,sst2,retrain
    python bench/loop.py --sequence finance,yelp,sst2,forget,retrain   # + a challenger built to forget (newest domain only, no replay): the gate must refuse it
    python bench/loop.py --simulate-hours 24 --requests 20000

Logs (service.log, controller.log, runs/refine-*.log) stay under the bench home, printed at the start:
$DRIFTLOOP_HOME if set, else a new temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/ (the script's own directory, where loop_phases is): bench/finetune.py is not the package
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no "Loading weights" bars in the narration
BASE_HOME = Path(os.environ.get("DRIFTLOOP_HOME") or tempfile.mkdtemp(prefix="driftloop-bench-loop-"))
os.environ["DRIFTLOOP_HOME"] = str(BASE_HOME / "champion")
os.environ.pop("BENTOML_HOME", None)
os.environ.pop("DRIFTLOOP_DB_URL", None)

import loop_phases as lp  # noqa: E402  (bench/loop_phases.py)

from driftloop.replay import labelled_rows  # noqa: E402


def fresh_home(name: str) -> Path:
    home = BASE_HOME / name
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    return home


# --- scenarios ----------------------------------------------------------------------------------------

def scenario(name: str, champion_home: Path, champion: str, corpus: lp.Corpus, models: lp.Models, sets: list[str], feedback: float,
             timeout_s: float, say) -> dict:
    from core import (
        alias,  # noqa: PLC0415
        audit,  # noqa: PLC0415
    )
    from monitoring import store  # noqa: PLC0415

    home = BASE_HOME / f"run-{name}"
    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(champion_home, home, symlinks=True)
    shift = corpus.traffic[name]
    probes = lp.Tally()
    with lp.Stack(home, sets, say, feedback=feedback, feedback_delay_s=0) as stack:
        engine = stack.engine
        say(f"[{name}] stable: {len(corpus.stable)} SST-2 rows, feedback {feedback:.0%}")
        st = stack.replay(corpus.stable, seed=1)
        time.sleep(12)  # let the controller pass over the last stable window
        retrains_stable = len(audit.history(engine, limit=500, kinds=("retrain_started",)))
        first_shift_id = (store.latest(engine) or {}).get("window_last_id") or 0
        say(f"[{name}] shift: {len(shift)} rows, feedback {feedback:.0%}; retrains so far {retrains_stable}")
        t_shift = time.perf_counter()
        sh = stack.replay(shift, seed=2)
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
        served = promoted is not None and stack.wait_served(promoted, shift[0], probes)
    new = promoted or champion
    held = corpus.held
    result = {
        "scenario": name, "retrains_during_stable": retrains_stable, "requests_shift_to_alarm": requests_to_alarm,
        "retrains_after_shift": len(audit.history(engine, limit=500, kinds=("retrain_started",))) - retrains_stable,
        "promotions": len(audit.history(engine, limit=500, kinds=("promotion",))), "seconds_shift_to_promotion": seconds,
        "gate": [{k: g.get(k) for k in ("passed", "reasons", "champion_fresh_accuracy", "challenger_fresh_accuracy", "fresh_n", "p_value",
                                        "regression_loss")} for g in gates],
        "served_version_changed": bool(served), "failed_requests": st.errors + sh.errors + probes.errors,
        "champion_accuracy_on_shift_traffic": sh.to_json()["accuracy"],
        "shifted_accuracy_before": models.accuracy(champion, name), "shifted_accuracy_after": models.accuracy(new, name),
        "source_accuracy_before": models.accuracy(champion, lp.SOURCE), "source_accuracy_after": models.accuracy(new, lp.SOURCE),
        "held_out_rows": {"shifted": len(held[name]), "source": len(held[lp.SOURCE])},
        "last_policy": (audit.last(engine, "policy") or {}).get("reason"),
    }
    say(f"[{name}] " + json.dumps(result))
    return result


def run_scenarios(args, say) -> dict:
    names = ["yelp", "imdb", "finance"] if args.scenario == "all" else [args.scenario]
    extra = {"custom": labelled_rows(args.shift_data)} if args.shift_data else None
    corpus = lp.load_corpus(Path(args.data), [] if extra else names, train_rows=args.train_rows, stable=args.stable,
                         shift_traffic=args.shift_traffic, extra=extra)
    champion_home = fresh_home("champion")
    champion = lp.train_champion(champion_home, corpus.train, say)
    models = lp.Models(corpus.held)
    results = [scenario(name, champion_home, champion, corpus, models, args.sets, args.feedback, args.timeout, say)
               for name in (["custom"] if extra else names)]
    return {"champion": champion, "home": str(BASE_HOME), "scenarios": results}


def scenario_table(summary: dict) -> str:
    lines = [("| scenario | retrains (stable) | requests to alarm | retrains after shift | promotions | s to promotion "
              "| shifted acc before → after | SST-2 test before → after |"), "|---|---|---|---|---|---|---|---|"]
    for r in summary["scenarios"]:
        lines.append(f"| {r['scenario']} | {r['retrains_during_stable']} | {r['requests_shift_to_alarm']} | {r['retrains_after_shift']} "
                     f"| {r['promotions']} | {r['seconds_shift_to_promotion']} | {r['shifted_accuracy_before']} → {r['shifted_accuracy_after']} "
                     f"| {r['source_accuracy_before']} → {r['source_accuracy_after']} |")
    return "\n".join(lines)


# --- sequence and simulated day ------------------------------------------------------------------------

def parse_phases(text: str) -> list[str]:
    phases = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in phases if p not in lp.PHASES]
    if unknown or not phases:
        raise argparse.ArgumentTypeError(f"phases are among {', '.join(lp.PHASES)}; got {text!r}")
    return phases


def sequence(args, say) -> dict:
    corpus = lp.load_corpus(Path(args.data), args.sequence, train_rows=args.train_rows, stable=args.stable, shift_traffic=args.shift_traffic)
    opts = lp.SequenceOptions(args.sequence, settle_s=args.settle, timeout_s=args.timeout, swap_rate=args.swap_rate, rate=args.rate or 40.0,
                           retrain_min_labels=args.retrain_min_labels, retrain_topup=args.retrain_topup)
    return lp.run_sequence(fresh_home("sequence"), corpus, opts, args.sets, say, feedback=args.feedback, feedback_delay_s=args.feedback_delay)


def simulate(args, say) -> dict:
    # SST-2 traffic: every train row after the champion's and the stable slice (sampled with replacement)
    corpus = lp.load_corpus(Path(args.data), ["finance", "imdb", "yelp"], train_rows=args.train_rows, stable=args.stable,
                         shift_traffic=args.shift_traffic, sst2_traffic=10**9)
    # simulated time: an hour lasts --hour-seconds of wall time, so traffic is paced to it and the policy's
    # wall-clock cooldown (600 s of a real day) is scaled the same way; --set overrides come after
    rate = args.rate or (args.requests / args.simulate_hours) / args.hour_seconds
    sets = [f"policy.cooldown_s={600 * args.hour_seconds / 3600:.1f}", *args.sets]
    opts = lp.SimulateOptions(hours=args.simulate_hours, requests=args.requests, chunk=args.chunk, rate=rate, timeout_s=args.timeout,
                           seed=args.seed)
    say(f"simulated hour = {args.hour_seconds:g} s of wall time: {rate:.1f} requests/s, policy.cooldown_s scaled to {sets[0].split('=')[1]} s")
    return lp.run_simulation(fresh_home("simulate"), corpus, opts, sets, say, feedback=args.feedback, feedback_delay_s=args.feedback_delay)


def print_sequence(summary: dict) -> None:
    print("\n" + lp.sequence_table(summary["phases"]))
    print(f"\nrows lost (acknowledged, missing from the prediction log): {summary['rows_lost']}")
    print("\ntargets:")
    for t in summary["targets"]:
        print(f"  {'INFO' if t['pass'] is None else 'PASS' if t['pass'] else 'FAIL'}  {t['target']}: {t['detail']}")


def print_simulation(summary: dict) -> None:
    print("\n" + lp.simulation_table(summary))
    keys = ("requests", "failed_requests", "rows_lost", "retrains_started", "promotions", "rollbacks", "stable_requests", "stable_hours",
            "false_alarms_per_10k_stable")
    print("\n" + "\n".join(f"{k}: {json.dumps(summary[k])}" for k in keys))
    print(f"({summary['false_alarm_definition']})")
    held = summary["held_out"]
    print("\n| domain | champion | serving at end |\n|---|---|---|")
    for d in held["champion"]:
        print(f"| {d} | {held['champion'][d]} | {held['serving_at_end'][d]} |")
    print(f"serving at end: {summary['serving_at_end']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--scenario", choices=["yelp", "imdb", "finance", "all"], default="all")
    parser.add_argument("--shift-data", help="A labelled file to use as the (only) shifted traffic (scenario mode).")
    parser.add_argument("--sequence", type=parse_phases, help=f"Phases in order, comma-separated, among {','.join(lp.PHASES)}.")
    parser.add_argument("--simulate-hours", type=int, help="Simulated day of this many hours (24: the template as is).")
    parser.add_argument("--train-rows", type=int, default=3000)
    parser.add_argument("--stable", type=int, default=1000, help="Stable SST-2 requests before the shift.")
    parser.add_argument("--shift-traffic", type=int, default=1000, help="Shifted requests per domain (the rest of the file is held out).")
    parser.add_argument("--feedback", type=float, default=0.5, help="Share of requests whose true label is posted.")
    parser.add_argument("--feedback-delay", type=float, default=2.0, help="Seconds between a replay's last request and its feedback.")
    parser.add_argument("--timeout", type=float, default=900, help="Longest wait for the loop after a phase (or a scenario's shift).")
    parser.add_argument("--settle", type=float, default=90, help="Sequence: seconds with no refinement after a phase's traffic = settled.")
    parser.add_argument("--swap-rate", type=float, default=2.0, help="Sequence: req/s of background traffic while a refinement runs.")
    parser.add_argument("--retrain-min-labels", type=int, default=200, help="Sequence: top up the champion's labelled traffic below this.")
    parser.add_argument("--retrain-topup", type=int, default=400, help="Sequence: requests of the top-up (last phase's domain).")
    parser.add_argument("--requests", type=int, default=20_000, help="Simulated day: total requests.")
    parser.add_argument("--chunk", type=int, default=250, help="Simulated day: requests per replay (feedback comes after each).")
    parser.add_argument("--hour-seconds", type=float, default=50.0,
                        help="Simulated day: wall seconds per simulated hour (paces traffic, scales the policy's cooldown).")
    parser.add_argument("--rate", type=float, help="Cap on req/s (sequence: default 40, paced like live traffic; simulated day: as fast as 8 clients go).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="One JSON summary on stdout; narration on stderr.")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="Controller config, e.g. refine.replay_ratio=2.")
    args = parser.parse_args()
    if args.sequence and args.simulate_hours:
        parser.error("--sequence and --simulate-hours are separate modes")
    if args.simulate_hours is not None and not 1 <= args.simulate_hours <= args.requests:
        parser.error("--simulate-hours must be between 1 and --requests")
    say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else (lambda s: print(s, flush=True))
    say(f"bench home: {BASE_HOME}")
    if args.sequence:
        summary, show = sequence(args, say), print_sequence
    elif args.simulate_hours:
        summary, show = simulate(args, say), print_simulation
    else:
        summary, show = run_scenarios(args, say), (lambda s: print("\n" + scenario_table(s)))
    if args.json:
        print(json.dumps(summary))
    else:
        show(summary)


if __name__ == "__main__":
    main()
