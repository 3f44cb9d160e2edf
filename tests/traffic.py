"""Log predictions into a state DB exactly as the service does (same Predictor, same writer), in a
subprocess so the model store and DB of that environment are used, not this test process's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_CODE = """
import json, sys, uuid
from core.home import configure_environment; configure_environment()
from core.inference import load_predictor
from core.statedb import get_engine
from core import predlog
args = json.loads(sys.stdin.read())
p = load_predictor(args["tag"]); engine = get_engine(); predlog.ensure_schema(engine)
texts = [t for t, _ in args["rows"]]
for s in range(0, len(texts), 64):
    chunk = texts[s:s + 64]
    out = p.predict(chunk)
    rows = []
    for i, text in enumerate(chunk):
        probs = {n: float(out.probs[i, j]) for j, n in enumerate(p.label_names)}
        rows.append(predlog.LoggedPrediction(f"{s + i:08d}" + uuid.uuid4().hex[:16], text, p.label_names[int(out.probs[i].argmax())],
                    float(out.probs[i].max()), probs, out.descriptors[i], out.truncated[i], out.embeddings[i]))
    predlog.write_batch(engine, args["tag"], rows)
    if args["feedback"]:
        truth = [y if isinstance(y, str) else p.label_names[y] for _, y in args["rows"][s:s + 64]]
        predlog.record_feedback(engine, [(r.request_id, y) for r, y in zip(rows, truth)], lambda v: p.label_names)
"""


def log_traffic(env: dict, tag: str, rows: list[tuple[str, int | str]], feedback: bool = False) -> None:
    """Predict and log `rows` (text, true label as index or name) for `tag`, with feedback if asked,
    in the environment `env` (its DRIFTLOOP_HOME, DRIFTLOOP_DB_URL, BENTOML_HOME)."""
    proc = subprocess.run([sys.executable, "-c", _CODE], input=json.dumps({"tag": tag, "rows": rows, "feedback": feedback}),
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
