"""Content-addressed, durable datasets: what every model was trained on, gated on and profiled on.

A refinement replays the rows of *every* ancestor, and the gate re-scores a regression suite that
grows with each promotion; both must outlive the process that made them. Scratch directories do
not (`runs/` is safe to delete), nor does the user's original file (it moves, it changes). So each
dataset a model depends on is written once, here, under its own sha256:

    <BentoML home>/datasets/<sha256>.jsonl      one {"text", "label"} object per line

beside the model store (default `$DRIFTLOOP_HOME/bentoml`): the models and the rows their lineage
points to live, move and are backed up together, also when several homes share one model store.

The name is the hash of the bytes, so a reference in a model's lineage (`{"sha256", "rows"}`) pins
exactly those rows; a reader checks the hash and refuses a file that does not match (one line).
Writes go to a temporary file in the same directory, are fsynced and renamed into place, so a kill
at any moment leaves either no file or the whole file, never half of one; writing the same rows
twice is a no-op. JSON Lines because the trainer reads it as it is (`data.path`), and texts may hold
tabs or quotes that a TSV would mangle.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import DriftloopError
from core.home import bentoml_home

Row = tuple[str, str]  # (text, label name)


@dataclass(frozen=True)
class DatasetRef:
    """What a lineage records about a stored dataset."""

    sha256: str
    rows: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | None) -> "DatasetRef | None":
        if not data or not data.get("sha256"):
            return None
        return cls(str(data["sha256"]), int(data.get("rows", 0)))


def store_dir() -> Path:
    path = bentoml_home() / "datasets"
    path.mkdir(parents=True, exist_ok=True)
    return path


def path_of(ref: DatasetRef | str) -> Path:
    sha = ref.sha256 if isinstance(ref, DatasetRef) else ref
    return store_dir() / f"{sha}.jsonl"


def _encode(rows: Iterable[Row]) -> tuple[bytes, int]:
    lines = [json.dumps({"text": text, "label": str(label)}, ensure_ascii=False) for text, label in rows]
    return ("\n".join(lines) + "\n" if lines else "").encode("utf-8"), len(lines)


def put(rows: Iterable[Row]) -> DatasetRef:
    """Store `rows` (order kept) and return their reference; idempotent."""
    payload, count = _encode(rows)
    sha = hashlib.sha256(payload).hexdigest()
    target = path_of(sha)
    if target.exists() and target.stat().st_size == len(payload):
        return DatasetRef(sha, count)
    fd, tmp = tempfile.mkstemp(prefix=f".{sha[:12]}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return DatasetRef(sha, count)


def get(ref: DatasetRef) -> list[Row]:
    """The rows of a stored dataset, after checking that the bytes still hash to its name."""
    path = path_of(ref)
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise DriftloopError(f"dataset {ref.sha256[:12]} is missing from {path.parent} (was the model store copied without it, or pruned?)") from None
    if hashlib.sha256(payload).hexdigest() != ref.sha256:
        raise DriftloopError(f"dataset {ref.sha256[:12]} is corrupt: {path} does not hash to its name")
    rows = [json.loads(line) for line in payload.decode("utf-8").splitlines() if line]
    return [(r["text"], r["label"]) for r in rows]
