"""Baseline (b) for bench/serve.py: the same model behind a plain ASGI app, one forward pass per
request, no batching, no logging — what a first attempt at serving usually looks like.

    python bench/naive_server.py MODEL_TAG PORT [RUNTIME]

RUNTIME (torch, onnx, onnx-int8; default torch) is the same model runtime driftloop serves with
(core/runtimes.py), so "driftloop vs naive" compares servers, not runtimes.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvicorn  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from core.runtimes import load_runtime_predictor  # noqa: E402

predictor = load_runtime_predictor(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 else "torch", int8_tolerance_pt=100)


def _predict(texts: list[str]) -> list[dict]:
    out = predictor.predict(texts)
    return [{"label": predictor.label_names[int(p.argmax())], "confidence": float(p.max())} for p in out.probs]


async def predict(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse(await run_in_threadpool(_predict, body["texts"]))


async def ready(_: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/readyz", ready)])

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
