"""The reference profile: what "normal" looks like for a model, stored in its directory.

Built from the validation split with the same `Predictor` the service uses, so live traffic and
reference are measured identically: calibrated probabilities, confidence, text descriptors and
pooled embeddings. The monitor compares windows of live predictions against it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.descriptors import DESCRIPTOR_COLUMNS
from core.inference import Predictions

PROFILE_FILE = "reference.parquet"
EMBEDDINGS_FILE = "reference_embeddings.npy"


def prob_column(label: str) -> str:
    return f"prob_{label}"


def build(texts: list[str], labels: list[int | None], label_names: list[str], preds: Predictions) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per reference text: truth (None where unlabelled), prediction, calibrated probabilities, descriptors."""
    frame = pd.DataFrame({
        "text": texts,
        "label": [None if y is None else label_names[y] for y in labels],
        "prediction": [label_names[i] for i in preds.labels],
        "confidence": preds.probs.max(axis=1),
        "truncated": preds.truncated,
    })
    for i, name in enumerate(label_names):
        frame[prob_column(name)] = preds.probs[:, i]
    desc = pd.DataFrame(preds.descriptors, columns=list(DESCRIPTOR_COLUMNS))
    frame = pd.concat([frame, desc], axis=1)
    return frame, preds.embeddings.astype(np.float32)


def save(directory: Path, frame: pd.DataFrame, embeddings: np.ndarray) -> None:
    frame.to_parquet(directory / PROFILE_FILE, index=False)
    np.save(directory / EMBEDDINGS_FILE, embeddings)


def load(directory: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """The reference rows and their embeddings (row i of the array belongs to row i of the frame)."""
    return pd.read_parquet(directory / PROFILE_FILE), np.load(directory / EMBEDDINGS_FILE)
