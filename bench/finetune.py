"""Fine-tuning throughput and accuracy: driftloop's defaults vs what a plain loop does.

Trains the default base model on N SST-2 rows twice in one process, with identical data, seed,
optimiser and schedule:

* driftloop: dynamic padding (each batch padded to its longest text) + length-grouped batches;
* baseline:  every batch padded to max_length (128), random batches — what a plain loop does.

Prints train samples/s, wall time and SST-2 test accuracy for both, and their ratio.

    python bench/finetune.py                      # 4,000 rows x 2 epochs (CPU default)
    python bench/finetune.py --rows 60000 --epochs 3   # the full SST-2 train set (GPU)
    python bench/finetune.py --rows 67349 --epochs 1 --register   # also registers driftloop's run
                                                                  # (promoted), for bench/serve.py --model
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DRIFTLOOP_HOME", tempfile.mkdtemp(prefix="driftloop-bench-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from finetune.config import load_config  # noqa: E402
from finetune.pipeline import build_lineage, evaluate, load_data, register_fitted, root_data_lineage  # noqa: E402
from finetune.training import fit  # noqa: E402


def run(label: str, overrides: dict, register: bool = False) -> dict:
    started = time.perf_counter()
    cfg = load_config(None, overrides)
    data = load_data(cfg)
    fitted = fit(cfg, data, quiet=True, progress=False)
    ev = evaluate(cfg, fitted, data)
    tag = None
    if register:  # the same fitted model, registered as `driftloop train` would (no third fine-tune to serve it)
        lineage = build_lineage(cfg, fitted, data, ev, None, started, extra=root_data_lineage(data, ev, source=cfg.data.path))
        tag = register_fitted(cfg, fitted, data, ev, lineage).tag
    result = {
        "run": label,
        "train_rows": fitted.train_rows,
        "epochs": fitted.epochs_run,
        "train_seconds": round(fitted.train_seconds, 1),
        "samples_per_second": round(fitted.samples_per_second, 1),
        "test_accuracy": round(ev.metrics["test"]["accuracy"], 4),
        "device": fitted.device,
        **({"model": tag} if tag else {}),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--register", action="store_true",
                        help="Register driftloop's run in the model store and promote it (its tag is printed as \"model\").")
    args = parser.parse_args()
    common = {
        "data.path": f"{args.data_dir}/train.tsv",
        "data.test_path": f"{args.data_dir}/test.tsv",
        "data.max_rows": args.rows,
        "training.epochs": args.epochs,
        "training.batch_size": args.batch_size,
        "report": False,
    }
    ours = run("driftloop (dynamic padding + length grouping)",
               {**common, "registry.promote": "always"} if args.register else common, register=args.register)
    if args.skip_baseline:
        return
    base = run("baseline (pad to 128, random batches)",
               {**common, "training.dynamic_padding": False, "training.group_by_length": False})
    ratio = ours["samples_per_second"] / base["samples_per_second"]
    delta = (ours["test_accuracy"] - base["test_accuracy"]) * 100
    print("\n| run | rows x epochs | train s | samples/s | SST-2 test acc |\n|---|---|---|---|---|")
    for r in (ours, base):
        print(f"| {r['run']} | {args.rows} x {args.epochs:g} | {r['train_seconds']} | {r['samples_per_second']} | {r['test_accuracy']:.4f} |")
    print(f"\nspeed-up vs baseline: {ratio:.2f}x samples/s; accuracy difference {delta:+.1f} pt; device {ours['device']}")


if __name__ == "__main__":
    main()
