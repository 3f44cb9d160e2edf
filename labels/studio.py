"""Label Studio as driftloop's annotation queue, over its REST API (httpx).

One project per model label set (`<prefix>: negative / positive`), with a single-choice text
config made from the model's label names and "Uncertainty sampling", so annotators get the tasks
the model is least sure of first. Each task carries the prediction's request id and the model's
calibrated guess as a pre-annotation with its score: Label Studio orders by that score when the
prediction's model version is the project's, so every import sets the project's model version to
the newest one imported.

Answers come back two ways, both into labels/answers.py (the `/feedback` path):
- a webhook on the controller (`POST /labels/webhook`), sent by Label Studio with a secret header
  (its webhooks are not signed) on ANNOTATION_CREATED/UPDATED; delivery is synchronous with a 1 s
  timeout and never retried, so
- the controller also polls the tasks of its open requests (`sync`: sent, or expired in the last
  week), which catches a first answer a webhook missed and is the whole path when no webhook can
  reach the controller. An answer changed after the first one arrives by webhook (or `driftloop
  labels import`); re-polling every answered task would cost an export of weeks of tasks per sync.

Why not label-studio-sdk: in driftloop's environment it brings 24 packages (opencv, black, isort,
datamodel-code-generator...) for the seven calls below, and its current release needs numpy < 2.3;
Label Studio itself runs in its own environment (Makefile: `make labelstudio`), where the tests'
simulated annotator uses the SDK.

Label Studio down or slow never stops serving or monitoring: requests stay `pending` in the state DB
and are sent at the next sync that reaches it; `/status` and `driftloop_labels_tool_up` say so.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from html import escape

import httpx
from sqlalchemy.engine import Engine

from core import registry
from core.errors import DriftloopError
from labels import answers, requests
from labels.config import LabelsConfig

log = logging.getLogger("driftloop.labels")
SECRET_HEADER = "X-Driftloop-Secret"
WEBHOOK_ACTIONS = ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"]
BATCH = 100  # tasks per import and per export call


class StudioUnavailable(DriftloopError):
    """Label Studio did not answer, or answered an error: requests stay queued."""


def label_config(label_names: list[str]) -> str:
    choices = "".join(f'<Choice value="{escape(name, quote=True)}"/>' for name in label_names)
    return (f'<View><Text name="text" value="$text"/><Choices name="label" toName="text" choice="single" '
            f'showInLine="true">{choices}</Choices></View>')


def answer_of(task: dict, annotations: list[dict]) -> answers.Answer | None:
    """The answer a task's annotations give: the newest one that is not a skip, else a skip; None
    when it has none. Annotators are `labelstudio:user<id>`."""
    request_id = (task.get("data") or {}).get("request_id")
    if not request_id or not annotations:
        return None
    newest = sorted(annotations, key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0))
    given = [a for a in newest if not a.get("was_cancelled")]
    chosen = given[-1] if given else newest[-1]
    who = chosen.get("completed_by")
    annotator = f"labelstudio:user{who.get('id') if isinstance(who, dict) else who}" if who is not None else None
    if chosen.get("was_cancelled"):
        return answers.Answer(str(request_id), None, skipped=True, annotator=annotator)
    for item in chosen.get("result") or []:
        choices = (item.get("value") or {}).get("choices") or []
        if choices:
            return answers.Answer(str(request_id), str(choices[0]), annotator=annotator)
    return answers.Answer(str(request_id), None, skipped=True, annotator=annotator)  # submitted empty


def answer_from_webhook(payload: dict) -> answers.Answer | None:
    """The answer in a webhook payload (ANNOTATION_CREATED / ANNOTATION_UPDATED); None for others."""
    if payload.get("action") not in WEBHOOK_ACTIONS or not isinstance(payload.get("annotation"), dict):
        return None
    return answer_of(payload.get("task") or {}, [payload["annotation"]])


@dataclass
class Studio:
    url: str
    token: str
    timeout_s: float = 10.0
    _projects: dict[tuple[str, ...], int] = field(default_factory=dict)

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            with httpx.Client(base_url=self.url.rstrip("/"), timeout=self.timeout_s,
                              headers={"Authorization": f"Token {self.token}"}) as client:
                response = client.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise StudioUnavailable(f"Label Studio at {self.url} unreachable: {type(err).__name__}: {err}") from None
        if response.status_code >= 400:
            raise StudioUnavailable(f"Label Studio {method} {path}: HTTP {response.status_code} {response.text[:200]}")
        return response

    def check(self) -> None:
        """Raise StudioUnavailable unless Label Studio answers its health check."""
        self._call("GET", "/health")

    def healthy(self) -> bool:
        try:
            self.check()
            return True
        except StudioUnavailable:
            return False

    def project_for(self, label_names: list[str], prefix: str = "driftloop") -> int:
        """The project of this label set, made on first use."""
        key = tuple(label_names)
        if key in self._projects:
            return self._projects[key]
        title = f"{prefix}: {' / '.join(label_names)}"[:50]
        listed = self._call("GET", "/api/projects", params={"page_size": 1000, "title": title}).json()
        found = [p for p in (listed.get("results", listed) if isinstance(listed, dict) else listed) if p.get("title") == title]
        if found:
            project = found[0]["id"]
        else:
            project = self._call("POST", "/api/projects", json={
                "title": title, "label_config": label_config(label_names), "sampling": "Uncertainty sampling",
                "description": "Predictions driftloop asks people to label: random samples confirm drift, informative ones train. "
                               "The model's calibrated guess is pre-filled; the least sure come first.",
                "show_skip_button": True}).json()["id"]
            self._queue_view(project)
        self._projects[key] = project
        return project

    def _queue_view(self, project: int) -> None:
        """The project's task list as an annotator's queue: least sure first (the model's score), with
        the model's guess and score, the request's kind and purpose, and no bookkeeping columns."""
        hidden = [f"tasks:{c}" for c in ("inner_id", "annotations_ids", "annotations_results", "predictions_model_versions",
                                         "file_upload", "storage_filename", "updated_at", "updated_by", "avg_lead_time",
                                         "draft_exists", "total_predictions", "annotators", "comment_count", "unresolved_comment_count",
                                         "comment_authors", "ground_truth", "data.request_id")]
        self._call("POST", "/api/dm/views/", params={"project": project}, json={"project": project, "data": {
            "title": "queue: least sure first", "ordering": ["tasks:predictions_score"],
            "hiddenColumns": {"explore": hidden, "labeling": hidden}}})

    def ensure_webhook(self, project: int, url: str, secret: str) -> None:
        """A webhook to the controller on this project (made once; its secret header kept current)."""
        hooks = self._call("GET", "/api/webhooks", params={"project": project}).json()
        body = {"url": url, "project": project, "send_payload": True, "send_for_all_actions": False, "actions": WEBHOOK_ACTIONS,
                "headers": {SECRET_HEADER: secret}, "is_active": True}
        mine = [h for h in hooks if h.get("url") == url]
        if mine:
            self._call("PATCH", f"/api/webhooks/{mine[0]['id']}", json=body)
        else:
            self._call("POST", "/api/webhooks", json=body)

    def import_tasks(self, project: int, rows: list[dict]) -> list[int]:
        """One task per pending request, with the model's guess as a prediction; returns task ids in order."""
        tasks = [{"data": {"text": r["text"], "request_id": r["request_id"], "kind": r["kind"], "purpose": r["purpose"]},
                  "predictions": [{"model_version": r["model_version"], "score": round(float(r["confidence"]), 6),
                                   "result": [{"from_name": "label", "to_name": "text", "type": "choices",
                                               "value": {"choices": [r["label"]]}}]}]} for r in rows]
        out = self._call("POST", f"/api/projects/{project}/import", params={"return_task_ids": "true"}, json=tasks).json()
        ids = out.get("task_ids") or []
        if len(ids) != len(rows):
            raise StudioUnavailable(f"Label Studio imported {len(ids)} of {len(rows)} tasks")
        self._call("PATCH", f"/api/projects/{project}", json={"model_version": rows[-1]["model_version"]})
        return [int(i) for i in ids]

    def answers_for(self, project: int, task_ids: list[int]) -> list[answers.Answer]:
        """The answers given so far on these tasks (the export of just those tasks)."""
        out = []
        for start in range(0, len(task_ids), BATCH):
            chunk = task_ids[start:start + BATCH]
            tasks = self._call("GET", f"/api/projects/{project}/export",
                               params=[("exportType", "JSON"), ("download_all_tasks", "true")] + [("ids[]", i) for i in chunk]).json()
            wanted = set(chunk)
            for task in tasks:
                if task.get("id") in wanted:
                    answer = answer_of(task, task.get("annotations") or [])
                    if answer is not None:
                        out.append(answer)
        return out


def _label_names(version: str, cache: dict[str, list[str]]) -> list[str]:
    if version not in cache:
        cache[version] = list(registry.get(version).lineage["label_names"])
    return cache[version]


def sync(engine: Engine, studio: Studio, config: LabelsConfig, webhook_url: str | None = None, secret: str | None = None,
         now: dt.datetime | None = None, label_names: dict[str, list[str]] | None = None) -> dict:
    """Expire old requests, send the pending ones, and poll answers to those sent: one round.
    `label_names` (model version → names) spares the model store where the caller knows them.
    Raises StudioUnavailable when Label Studio cannot be reached (nothing is lost: requests stay queued)."""
    studio.check()  # every round, work or not: /status and driftloop_labels_tool_up say whether it is reachable
    expired = requests.expire(engine, config, now)
    names: dict[str, list[str]] = dict(label_names or {})
    sent = 0
    pending = requests.pending(engine, limit=1000)
    by_labels: dict[tuple[str, ...], list[dict]] = {}
    for row in pending:
        by_labels.setdefault(tuple(_label_names(row["model_version"], names)), []).append(row)
    for label_names, rows in by_labels.items():
        project = studio.project_for(list(label_names), config.studio_project)
        if webhook_url and secret:
            studio.ensure_webhook(project, webhook_url, secret)
        for start in range(0, len(rows), BATCH):
            chunk = rows[start:start + BATCH]
            ids = studio.import_tasks(project, chunk)
            requests.mark_sent(engine, {r["id"]: str(t) for r, t in zip(chunk, ids)}, now)
            sent += len(chunk)
    polled = []
    for version, task_ids in requests.sent_tasks(engine).items():
        project = studio.project_for(_label_names(version, names), config.studio_project)
        polled += studio.answers_for(project, task_ids)
    applied = answers.apply(engine, polled, label_names=names) if polled else answers.Applied()
    return {"expired": expired, "sent": sent, "answers_polled": len(polled), **applied.to_json()}
