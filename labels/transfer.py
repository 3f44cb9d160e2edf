"""Label requests out to any annotation tool and answers back in, as CSV or JSON Lines.

For teams that label elsewhere: `driftloop labels export` writes the pending requests (marking them
sent), `driftloop labels import` reads the answers and records them through labels/answers.py, the
same path as Label Studio's answers and `/feedback`. An answer file needs `request_id` and
`label` (empty, or a `skipped` column that is true, for a skipped item); `annotator` is optional.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from sqlalchemy.engine import Engine

from core.errors import DriftloopError
from labels import answers, requests

EXPORT_FIELDS = ("request_id", "text", "kind", "purpose", "model_version", "model_label", "model_confidence", "model_scores")
TRUE = {"1", "true", "yes", "y", "skipped"}


def _format(path: Path, fmt: str | None) -> str:
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt not in ("csv", "jsonl"):
        raise DriftloopError(f"unknown format {fmt!r} for {path}: csv or jsonl (--format, or a .csv/.jsonl file name)")
    return fmt


def export(engine: Engine, path: Path, fmt: str | None = None, limit: int = 10_000) -> int:
    """Write up to `limit` pending requests to `path` and mark them sent; returns how many."""
    fmt = _format(path, fmt)
    rows = requests.pending(engine, limit)
    items = [{"request_id": r["request_id"], "text": r["text"], "kind": r["kind"], "purpose": r["purpose"],
              "model_version": r["model_version"], "model_label": r["label"], "model_confidence": round(float(r["confidence"]), 4),
              "model_scores": r["probs"]} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        if fmt == "csv":
            writer = csv.DictWriter(fh, fieldnames=EXPORT_FIELDS)
            writer.writeheader()
            writer.writerows(items)
        else:
            fh.writelines(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    tmp.replace(path)  # the file is whole before any request is marked sent
    requests.mark_sent(engine, {r["id"]: f"export:{path.name}" for r in rows})
    return len(items)


def read_answers(path: Path, fmt: str | None = None) -> list[answers.Answer]:
    """Answers from a CSV or JSONL file; a malformed line is one clear error naming it."""
    fmt = _format(path, fmt)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DriftloopError(f"cannot read {path}: {err.strerror or err}") from None
    if fmt == "csv":
        records = list(csv.DictReader(text.splitlines()))
        where = lambda i: f"{path}:{i + 2}"  # noqa: E731 - header is line 1
    else:
        records = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DriftloopError(f"{path}:{i + 1}: not JSON ({err.msg})") from None
        where = lambda i: f"{path}: record {i + 1}"  # noqa: E731
    out = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not str(rec.get("request_id") or "").strip():
            raise DriftloopError(f"{where(i)}: no request_id")
        label = str(rec.get("label") or "").strip()
        skipped = str(rec.get("skipped") or "").strip().lower() in TRUE or rec.get("skipped") is True or not label
        out.append(answers.Answer(str(rec["request_id"]).strip(), None if skipped else label, skipped,
                                  str(rec.get("annotator") or "").strip() or None))
    return out
