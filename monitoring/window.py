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
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from finetune.descriptors import DESCRIPTOR_COLUMNS
from finetune.profile import prob_column
from monitoring.predlog import predictions


@dataclass
class Window:
    """Rows of the prediction log, oldest first, plus their embeddings (row i ↔ embeddings[i])."""

    model_version: str
    frame: pd.DataFrame  # id, created_at, prediction, confidence, prob_<label>..., descriptors, truncated, label (feedback or NaN)
    embeddings: np.ndarray  # (n, d) float32; rows logged without an embedding are left out of the embedding test

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


def latest_model_version(engine: Engine) -> str | None:
    """The model version of the most recent logged prediction (what served last)."""
    with engine.connect() as conn:
        return conn.execute(select(predictions.c.model_version).order_by(predictions.c.id.desc()).limit(1)).scalar()


def load(engine: Engine, model_version: str, label_names: list[str], *, last: int | None = 1000,
         since: dt.datetime | None = None, until: dt.datetime | None = None, up_to_id: int | None = None) -> Window:
    """The last `last` predictions of `model_version` (optionally within [since, until) and id ≤ up_to_id)."""
    cols = predictions.c
    query = select(cols.id, cols.created_at, cols.label, cols.confidence, cols.probs, cols.truncated, cols.embedding,
                   cols.feedback_label, *(cols[name] for name in DESCRIPTOR_COLUMNS)).where(cols.model_version == model_version)
    if since is not None:
        query = query.where(cols.created_at >= since)
    if until is not None:
        query = query.where(cols.created_at < until)
    if up_to_id is not None:
        query = query.where(cols.id <= up_to_id)
    query = query.order_by(cols.id.desc())
    if last is not None:
        query = query.limit(last)
    with engine.connect() as conn:
        rows = conn.execute(query).all()[::-1]
    frame = pd.DataFrame({
        "id": [r.id for r in rows],
        "created_at": pd.to_datetime([r.created_at for r in rows], utc=True),
        "prediction": [r.label for r in rows],
        "confidence": np.array([r.confidence for r in rows], dtype=float),
        "truncated": [bool(r.truncated) for r in rows],
        "label": [r.feedback_label for r in rows],
    })
    probs = [json.loads(r.probs) for r in rows]
    for name in label_names:
        frame[prob_column(name)] = np.array([p.get(name, np.nan) for p in probs], dtype=float)
    for name in DESCRIPTOR_COLUMNS:
        frame[name] = np.array([getattr(r, name) for r in rows], dtype=float)
    vectors = [np.frombuffer(r.embedding, dtype=np.float32) for r in rows if r.embedding]
    embeddings = np.stack(vectors) if vectors else np.zeros((0, 0), dtype=np.float32)
    return Window(model_version, frame, embeddings)


def count_since(engine: Engine, model_version: str, after_id: int) -> int:
    """How many predictions of `model_version` were logged after row `after_id`."""
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(predictions)
                                .where(predictions.c.model_version == model_version, predictions.c.id > after_id)).scalar_one())
