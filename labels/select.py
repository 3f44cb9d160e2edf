"""Which logged predictions to ask a person about.

Two kinds, kept apart because they answer different questions:

- a **confirmation sample** is uniform at random over a drifted window's unlabelled rows: its
  answers are a sample of the traffic, so the policy may measure accuracy on them and confirm or
  refute a drop (core/predlog.py UNBIASED);
- an **informative batch** is for training: the rows the champion is least sure of (smallest
  margin between its two most probable classes, on the calibrated probabilities it served),
  spread over the traffic by k-means on the pooled embeddings the service logged, taking the
  least sure row of each cluster, one text at most once. Margin alone piles a batch onto one
  confusing region (near-duplicates); clustering first and picking by margin within clusters is
  the "cluster-margin" recipe (Citovsky et al., NeurIPS 2021), here with scikit-learn's KMeans.
  small-text (1.4.1, read for this) offers each half alone: BreakingTies (margin, through a
  classifier's predict_proba) and EmbeddingKMeans (the row nearest each k-means centre, on
  precomputed embeddings, uncertainty ignored); not the least sure row within each cluster, which
  is what a batch needs here. So the combination is written out, on the arrays the log holds.
"""

from __future__ import annotations

import json
import random

import numpy as np
from sklearn.cluster import KMeans
from sqlalchemy.engine import Engine

from core import predlog
from labels.requests import Candidate


def margin(probs: dict[str, float]) -> float:
    """Top-1 minus top-2 calibrated probability: 0 means a coin toss between two classes."""
    top = sorted(probs.values(), reverse=True) + [0.0]
    return float(top[0] - top[1])


def random_sample(engine: Engine, model_version: str, first_id: int, last_id: int, n: int, seed: int | str = 0,
                  exclude: set[str] = frozenset()) -> list[Candidate]:
    """`n` unlabelled rows drawn uniformly at random from ids [first_id, last_id] of `model_version`,
    leaving out the request ids in `exclude` (already asked about)."""
    rows = [r for r in predlog.unlabelled(engine, model_version, first_id, last_id, limit=100_000) if r.request_id not in exclude]
    picked = random.Random(str(seed)).sample(rows, min(n, len(rows)))
    return [Candidate(r.id, r.request_id) for r in sorted(picked, key=lambda r: r.id)]


def informative_batch(engine: Engine, model_version: str, since_id: int, n: int, pool_rows: int = 5000,
                      exclude: set[str] = frozenset(), seed: int = 0) -> list[Candidate]:
    """`n` rows to label for training: k-means (k = n) over the newest `pool_rows` unlabelled rows'
    embeddings since `since_id`, and in each cluster the row with the smallest margin; a text (by
    hash) is picked once; `exclude` holds request ids already chosen."""
    rows = [r for r in predlog.unlabelled(engine, model_version, since_id, limit=pool_rows, with_embedding=True)
            if r.request_id not in exclude]
    unique, seen = [], set()
    for r in rows:
        if r.text_sha256 not in seen:
            seen.add(r.text_sha256)
            unique.append(r)
    if n <= 0 or not unique:
        return []
    margins = np.array([margin(json.loads(r.probs)) for r in unique])
    if len(unique) <= n:
        order = np.argsort(margins)
        return [Candidate(unique[i].id, unique[i].request_id, json.dumps({"margin": round(float(margins[i]), 4)})) for i in order]
    vectors = np.stack([np.frombuffer(r.embedding, dtype=np.float32) for r in unique]).astype(np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    clusters = KMeans(n_clusters=n, n_init=1, random_state=seed).fit_predict(vectors)
    out = []
    for k in range(n):
        members = np.flatnonzero(clusters == k)
        if len(members):
            best = members[np.argmin(margins[members])]
            out.append((margins[best], Candidate(unique[best].id, unique[best].request_id,
                                                 json.dumps({"margin": round(float(margins[best]), 4), "cluster": k}))))
    return [c for _, c in sorted(out, key=lambda pair: pair[0])]
