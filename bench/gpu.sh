#!/usr/bin/env bash
# The GPU device check, in one command (<= 8 minutes on one recent GPU): a full SST-2 fine-tune and
# the serving table for each runtime, on CUDA. Run from the repository root on a machine with a GPU:
#
#     bash bench/gpu.sh                  # writes its figures under ${OUT:-bench-gpu-out}/
#
# 1. installs driftloop into .venv if needed (a CUDA build of torch must already be there, or the
#    default wheel from PyPI, which is CUDA-enabled on Linux x86-64), plus onnxruntime-gpu for the
#    ONNX runtimes' CUDA execution provider;
# 2. fine-tunes the default base model on the whole SST-2 train split (67k rows, 1 epoch; bf16 where
#    supported) and prints samples/s and SST-2 test accuracy against the pad-to-128 baseline;
# 3. serves the resulting model with each runtime (torch, onnx, onnx-int8) side by side and prints
#    req/s at 1, 32 and 64 clients, the offline ceilings and each runtime's SST-2 accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-gpu-out}"
mkdir -p "$OUT"
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  python3.11 -m venv .venv
  "$PY" -m pip install --quiet --upgrade pip
  "$PY" -m pip install --quiet -e '.[dev]'
fi
"$PY" -m pip install --quiet onnxruntime-gpu >/dev/null 2>&1 || echo "onnxruntime-gpu not installed: the ONNX runtimes run on CPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a "$OUT/gpu.txt"
export DRIFTLOOP_HOME="$PWD/$OUT/home" HF_HUB_OFFLINE=1
timeout 240 "$PY" bench/finetune.py --rows 67349 --epochs 1 2>&1 | tee "$OUT/finetune.txt"
TAG=$("$PY" -m driftloop train --data ../shared/data/sst2/train.tsv --test-data ../shared/data/sst2/test.tsv \
      --epochs 1 --quiet --json --promote always | "$PY" -c "import json, sys; print(json.load(sys.stdin)['model'])")
timeout 200 "$PY" bench/serve.py --model "$TAG" --runtimes torch onnx onnx-int8 --concurrency 1 32 64 \
  --duration 8 --rounds 2 2>&1 | tee "$OUT/serve.txt"
