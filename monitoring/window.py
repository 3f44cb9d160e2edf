"""Windows of the prediction log: what a monitor pass looks at.

A window is the last N predictions of one model version (or those in a time span), read in one
query with their descriptors, calibrated probabilities, pooled embeddings and any late labels, in
the same column layout as the model's reference profile so both go through the same tests.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from core import predlog
from core.descriptors import DESCRIPTOR_COLUMNS
from core.profile import prob_column


@dataclass
class Window:
    """Rows of the prediction log, oldest first, plus their embeddings (row i ↔ embeddings[i])."""

    model_version: str
    frame: pd.DataFrame  # id, created_at, prediction, confidence, prob_<label>..., descriptors, truncated,
                         # label (an unbiased feedback label or NaN), label_source (any label's source), runtime
    embeddings: np.ndarray  # (n, d) float32; rows logged without an embedding are left out of the embedding test

    other_runtime_rows: int = 0  # rows of the span left out: computed by another runtime than the window's

    @property
    def runtime(self) -> str:
        """The runtime that computed the window's rows (rows logged before runtimes were recorded: torch)."""
        if not self.size:
            return "torch"
        return str(self.frame["runtime"].iloc[0])

    @property
    def size(self) -> int:
        return len(self.frame)

    @property
    def first_id(self) -> int | None:
        return int(self.frame["id"].iloc[0]) if self.size else None

    @property
    def last_id(self) -> int | None:
        return int(self.frame["id"].iloc[-1]) if self.size else None

    @property
    def start(self) -> dt.datetime | None:
        return self.frame["created_at"].iloc[0].to_pydatetime() if self.size else None

    @property
    def end(self) -> dt.datetime | None:
        return self.frame["created_at"].iloc[-1].to_pydatetime() if self.size else None


def load(engine: Engine, model_version: str, label_names: list[str], *, last: int | None = 1000,
         since: dt.datetime | None = None, until: dt.datetime | None = None, up_to_id: int | None = None) -> Window:
    """The last `last` predictions of `model_version` (optionally within [since, until) and id ≤ up_to_id)."""
    rows = predlog.window_rows(engine, model_version, last=last, since=since, until=until, up_to_id=up_to_id)
    # One runtime per window: its rows are tested against that runtime's reference profile. A span
    # that crosses a runtime change (a restart with another runtime) keeps the runtime of most of
    # its rows and leaves the others out (counted), rather than test them against a profile that
    # another graph computed.
    served = [r.runtime or "torch" for r in rows]
    newest = {runtime: i for i, runtime in enumerate(served)}  # a tie goes to the runtime that served last
    majority = max(newest, key=lambda runtime: (served.count(runtime), newest[runtime])) if served else "torch"
    kept = [r for r, s in zip(rows, served) if s == majority]
    other, rows = len(rows) - len(kept), kept
    frame = pd.DataFrame({
        "id": [r.id for r in rows],
        "created_at": pd.to_datetime([r.created_at for r in rows], utc=True),
        "prediction": [r.label for r in rows],
        "confidence": np.array([r.confidence for r in rows], dtype=float),
        "truncated": [bool(r.truncated) for r in rows],
        # quality is measured on unbiased labels only: a label asked for because the model was unsure
        # is not a sample of the window (core/predlog.py UNBIASED); it trains, and is counted apart
        "label": [r.feedback_label if (r.feedback_source or predlog.ORGANIC) in predlog.UNBIASED else None for r in rows],
        "label_source": [(r.feedback_source or predlog.ORGANIC) if r.feedback_label is not None else None for r in rows],
        "runtime": [r.runtime or "torch" for r in rows],
    })
    probs = [json.loads(r.probs) for r in rows]
    for name in label_names:
        frame[prob_column(name)] = np.array([p.get(name, np.nan) for p in probs], dtype=float)
    for name in DESCRIPTOR_COLUMNS:
        frame[name] = np.array([getattr(r, name) for r in rows], dtype=float)
    vectors = [np.frombuffer(r.embedding, dtype=np.float32) for r in rows if r.embedding]
    embeddings = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return Window(model_version, frame, embeddings, other_runtime_rows=other)
