"""Answers to label requests, from any tool, into the prediction log through the `/feedback` path.

Label Studio's webhook, its polling fallback and `driftloop labels import` all end here, and here
goes through `core.predlog.record_feedback`, the function `/feedback` uses: an answer is idempotent
(the same label again changes nothing), a changed answer replaces the old one, and the label's
provenance (requested-random or requested-informative, the annotator) is recorded on the row. A
skipped task is counted and never used. An answer that arrives after its request expired is still
taken: the person's label is as true late as early.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from core import predlog, registry
from core.errors import DriftloopError
from labels import requests


@dataclass(frozen=True)
class Answer:
    request_id: str
    label: str | None  # None with skipped=True
    skipped: bool = False
    annotator: str | None = None


@dataclass
class Applied:
    recorded: int = 0
    replaced: int = 0
    unchanged: int = 0
    skipped: int = 0
    refused: list[str] = field(default_factory=list)  # one line each: unknown request, unknown label

    def to_json(self) -> dict:
        return self.__dict__.copy()


def _labels_of(cache: dict[str, list[str]]):
    def labels_of(version: str) -> list[str]:
        if version not in cache:
            cache[version] = list(registry.get(version).lineage["label_names"])
        return cache[version]
    return labels_of


def apply(engine: Engine, answers: list[Answer], label_names: dict[str, list[str]] | None = None) -> Applied:
    """Record `answers`; each one on its own, so one bad answer does not block the others.
    `label_names` (model version → names) spares the model store where the caller knows them."""
    out = Applied()
    labels_of = _labels_of(dict(label_names or {}))
    for answer in answers:
        request = requests.lookup(engine, answer.request_id)
        if request is None:
            out.refused.append(f"{answer.request_id}: not a label request of this log")
            continue
        if answer.skipped or answer.label is None:
            if request["status"] != "answered":  # a skip never undoes an answer
                requests.close(engine, answer.request_id, "skipped", None, answer.annotator)
                out.skipped += 1
            continue
        try:
            (result,) = predlog.record_feedback(engine, [(answer.request_id, answer.label)], labels_of,
                                                source=requests.KINDS[request["kind"]], annotator=answer.annotator)
        except (predlog.FeedbackError, DriftloopError) as err:  # unknown label; the model gone from the store
            out.refused.append(f"{answer.request_id}: {err}")
            continue
        requests.close(engine, answer.request_id, "answered", answer.label, answer.annotator)
        setattr(out, result["status"], getattr(out, result["status"]) + 1)
    return out
