"""The driftloop BentoML service: one class, obvious lifecycle.

startup   load the production model (GPU when present), warm it up, start the alias poller
/predict  batched by BentoML's adaptive batcher; one forward pass per batch gives labels,
          calibrated scores, pooled embeddings and descriptors; the batch is logged in one
          transaction *before* any of its requests is answered
/feedback late labels joined to logged predictions (needs the feedback token)
/model    the serving model's tag and lineage; /admin/reload forces a poll of the alias (admin token)

Auth, error shape, the OpenAPI document at /docs.json and log redaction: service/guard.py. What this
module changes outside the class (BentoML's home and dispatcher, middleware, logging) is done in
one place, `install()`, called once at the bottom when BentoML imports the module.

Start it with `driftloop serve` or `bentoml serve service.service:Classifier`.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import sqlite3
import sys
import time
import uuid
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

from core.home import configure_environment

# The one thing that must precede the imports: huggingface_hub (through transformers) and BentoML's
# store read their settings (telemetry off, BENTOML_HOME) once, when first imported.
configure_environment()

import bentoml  # noqa: E402
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator  # noqa: E402

from core import predlog, registry, tokens  # noqa: E402
from core.lifecycle import die_with_parent_now  # noqa: E402
from core.statedb import get_engine  # noqa: E402
from service import guard, metrics  # noqa: E402
from service.explain import occlusion  # noqa: E402
from service.model_holder import ModelHolder  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402

SETTINGS = ServiceSettings.from_env()  # read once per process: the API's limits and batching are built from it
log = logging.getLogger("driftloop.service")


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("text must not be empty or whitespace only")
    if "\x00" in text:  # PostgreSQL text columns refuse NUL: refuse it for every engine alike
        raise ValueError("text must not contain NUL characters")
    return text


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _few_words(text: str) -> str:
    n = len(text.split())
    if n > SETTINGS.explain_max_words:
        raise ValueError(f"text has {n} words; explain accepts at most {SETTINGS.explain_max_words}")
    return text


# The validators are the rules; the JSON Schema patterns say the same for clients (and fuzzers):
# a text has a non-space character; an /explain text has 1..explain_max_words words.
NOT_BLANK = {"pattern": r"^[^\x00]*[^\s\x00][^\x00]*$"}
NO_NUL = {"pattern": r"^[^\x00]+$"}
FEW_WORDS = {"pattern": rf"^\s*[^\s\x00]+(?:\s+[^\s\x00]+){{0,{SETTINGS.explain_max_words - 1}}}\s*$"}
Text = Annotated[str, Field(min_length=1, max_length=SETTINGS.max_chars, json_schema_extra=NOT_BLANK), AfterValidator(_not_blank)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=SETTINGS.max_texts_per_request)]
ExplainText = Annotated[str, Field(min_length=1, max_length=SETTINGS.explain_max_chars, json_schema_extra=FEW_WORDS),
                        AfterValidator(_not_blank), AfterValidator(_few_words)]


class Prediction(BaseModel):
    label: str
    scores: dict[str, float]
    confidence: float
    model_version: str
    request_id: str
    truncated: bool


RequestId = Annotated[str, Field(min_length=1, max_length=64, json_schema_extra=NO_NUL), AfterValidator(_no_nul)]
Label = Annotated[str, Field(min_length=1, max_length=255, json_schema_extra=NO_NUL), AfterValidator(_no_nul)]


class FeedbackItem(BaseModel):
    request_id: RequestId
    label: Label


class FeedbackRequest(BaseModel):
    """One label, `{"request_id": ..., "label": ...}`, or many, `{"items": [...]}`; never both, never null."""

    # Said in the schema too, so a schema-valid request is never refused (BentoML keeps a top-level oneOf).
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["request_id", "label"], "not": {"required": ["items"]}},
        {"required": ["items"], "not": {"anyOf": [{"required": ["request_id"]}, {"required": ["label"]}]}},
    ]})

    request_id: RequestId | None = None
    label: Label | None = None
    items: Annotated[list[FeedbackItem], Field(min_length=1, max_length=1000)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, data):
        if not isinstance(data, dict):
            return data  # pydantic reports the wrong type
        nulls = [k for k in ("request_id", "label", "items") if k in data and data[k] is None]
        if nulls:
            raise ValueError(f"{', '.join(nulls)} must not be null: leave the field out")
        single = "request_id" in data or "label" in data
        if "items" in data and single:
            raise ValueError("send either request_id and label, or items, not both")
        if "items" not in data and not ("request_id" in data and "label" in data):
            raise ValueError('send {"request_id": ..., "label": ...} or {"items": [...]}')
        return data


# What a full disk looks like from the prediction log's write, by engine: SQLite says "database or disk is
# full" (SQLITE_FULL) where a write() met ENOSPC; Postgres answers SQLSTATE 53100 (disk_full: "could not
# extend file ...: No space left on device"); a file system error may also surface as a bare OSError.
DISK_FULL_MESSAGES = ("database or disk is full", "no space left on device", "could not extend file", "disk quota exceeded")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NEARLY_FULL_BYTES = 1 << 20  # SQLite hides ENOSPC behind "disk I/O error" where it grows its -shm: judged by the free space


def _log_disk(engine) -> str | None:
    """The directory holding a SQLite state DB, one line; None for a database server."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:":
        return None
    return str(Path(database).resolve().parent).replace("\n", " ")


def _disk_full(err: BaseException, sqlite_dir: str | None = None) -> bool:
    """Whether a failed log write failed because its file system is full (anywhere in the exception chain)."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        code = getattr(e, "sqlite_errorcode", None)
        if code is not None and code & 0xFF == sqlite3.SQLITE_FULL:
            return True
        if getattr(e, "sqlstate", None) == "53100":  # psycopg: disk_full
            return True
        if any(m in str(e).lower() for m in DISK_FULL_MESSAGES):
            return True
        if code is not None and code & 0xFF == sqlite3.SQLITE_IOERR and sqlite_dir is not None:
            try:
                if shutil.disk_usage(sqlite_dir).free < NEARLY_FULL_BYTES:
                    return True
            except OSError:
                pass
        stack += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return False


class ServiceUnavailable(bentoml.exceptions.BentoMLException):
    """503 with a readable reason: BentoML answers every 5xx with a generic body, so the reason is
    handed to the guard, which puts it back into the response (service/guard.py)."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE

    def __init__(self, message: str):
        super().__init__(message)
        guard.note_unavailable(message)


class NotFound(bentoml.exceptions.NotFound):
    pass


class BadRequest(bentoml.exceptions.BadInput):
    pass


class Unprocessable(bentoml.exceptions.BentoMLException):
    error_code = HTTPStatus.UNPROCESSABLE_ENTITY


@bentoml.service(
    name="driftloop",
    workers=SETTINGS.workers,
    traffic={"timeout": 120},
    metrics={"enabled": True, "namespace": "bentoml_service",
             "duration": {"buckets": [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]}},
)
class Classifier:
    def __init__(self) -> None:
        self.settings = SETTINGS
        self.engine = get_engine(lock_timeout_s=self.settings.db_lock_timeout_s)
        predlog.ensure_schema(self.engine)
        self.models = ModelHolder(self.settings)
        result = self.models.sync()
        log.info("startup: %s", result)
        self.models.start_polling()

    # ------------------------------------------------------------------ health

    def __is_ready__(self) -> bool:
        """BentoML's /readyz hook: ready only once a model is loaded and warm."""
        return self.models.current is not None

    # ------------------------------------------------------------------ predict

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.max_latency_ms,
                 route="/predict")
    def predict(self, texts: Texts) -> list[Prediction]:
        """Classify texts: label, calibrated scores, confidence, model version and a request id each."""
        batch_started = time.perf_counter()
        serving = self.models.current  # one model for the whole batch, even if a swap happens meanwhile
        if serving is None:
            raise ServiceUnavailable("no production model is loaded yet: train and promote one (driftloop train)")
        out = serving.predictor.predict(list(texts), batch_size=self.settings.forward_batch_for(serving.predictor.device.type))
        names = serving.label_names
        rows, answers = [], []
        for i, text in enumerate(texts):
            rid = uuid.uuid4().hex
            probs = {name: float(out.probs[i, j]) for j, name in enumerate(names)}
            label = names[int(out.probs[i].argmax())]
            confidence = float(out.probs[i].max())
            rows.append(predlog.LoggedPrediction(rid, text, label, confidence, probs, out.descriptors[i],
                                                 out.truncated[i], out.embeddings[i]))
            answers.append(Prediction(label=label, scores=probs, confidence=confidence, model_version=serving.tag,
                                      request_id=rid, truncated=out.truncated[i]))
        if self.settings.log_predictions:
            started = time.perf_counter()
            try:
                predlog.write_batch(self.engine, serving.tag, rows, store_text=self.settings.store_text,
                                    runtime=serving.predictor.runtime)
            except Exception as err:  # noqa: BLE001 - never answer a prediction we could not log
                metrics.LOG_WRITE_FAILURES.inc()
                where = _log_disk(self.engine)
                if _disk_full(err, where):
                    log.error("prediction log write failed: the disk is full (%s)", where or "the database server")
                    raise ServiceUnavailable(f"the prediction log's disk is full: nothing was served; free space on "
                                             f"{where or 'the database server'} (retention: driftloop log compact)") from None
                log.error("prediction log write failed: %s", type(err).__name__)
                raise ServiceUnavailable("the prediction log is unavailable; nothing was served, retry later") from None
            metrics.LOG_WRITE_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(texts))
        metrics.BATCH_SECONDS.observe(time.perf_counter() - batch_started)
        for a in answers:
            metrics.PREDICTIONS.labels(model_version=a.model_version, label=a.label).inc()
            metrics.CONFIDENCE.labels(model_version=a.model_version).observe(a.confidence)
        n_trunc = sum(out.truncated)
        if n_trunc:
            metrics.TRUNCATED.labels(model_version=serving.tag).inc(n_trunc)
        return answers

    # ------------------------------------------------------------------ feedback

    @bentoml.api(route="/feedback")
    def feedback(self, body: FeedbackRequest, /) -> dict:
        """Late ground truth: {"request_id": ..., "label": ...} or {"items": [{"request_id": ..., "label": ...}, ...]}."""
        items = body.items or [FeedbackItem(request_id=body.request_id, label=body.label)]

        cache: dict[str, list[str]] = {}

        def labels_of(version: str) -> list[str]:
            if version not in cache:
                cache[version] = registry.get(version).lineage["label_names"]
            return cache[version]

        try:
            results = predlog.record_feedback(self.engine, [(i.request_id, i.label) for i in items], labels_of)
        except predlog.FeedbackError as err:
            metrics.FEEDBACK.labels(status="rejected").inc(len(items))
            raise (NotFound(str(err)) if err.status == 404 else Unprocessable(str(err))) from None
        for r in results:
            metrics.FEEDBACK.labels(status=r["status"]).inc()
        return {"results": results}

    # ------------------------------------------------------------------ model

    @bentoml.api(route="/model")
    def model(self) -> dict:
        """The serving model's tag and lineage."""
        serving = self.models.current
        if serving is None:
            raise ServiceUnavailable("no model loaded yet")
        lin = serving.lineage
        return {"model_version": serving.tag, "loaded_at": serving.loaded_at, "device": str(serving.predictor.device),
                "runtime": serving.predictor.runtime, "runtime_asked": self.settings.runtime,
                "runtime_note": serving.predictor.runtime_note,
                "label_names": serving.label_names, "temperature": serving.predictor.temperature,
                "last_reload_error": self.models.last_error,
                "lineage": {k: lin.get(k) for k in ("parent", "base_model", "created_at", "metrics", "data", "training", "versions")}}

    @bentoml.api(route="/explain")
    def explain(self, text: ExplainText) -> dict:
        """Per-word attributions for the predicted label (occlusion); one text, size-limited, not logged."""
        serving = self.models.current
        if serving is None:
            raise ServiceUnavailable("no model loaded yet")
        try:
            result = occlusion(serving.predictor, text, max_words=self.settings.explain_max_words)
        except ValueError as err:
            raise BadRequest(str(err)) from None
        return {**result, "model_version": serving.tag}

    @bentoml.api(route="/admin/reload")
    def reload(self) -> dict:
        """Poll the production alias now (this worker), retrying a previously refused model."""
        return self.models.sync(force=True)


def install(service=Classifier, settings: ServiceSettings = SETTINGS) -> None:
    """Everything serving changes outside this class, in one place, done once when BentoML imports
    this module (before it builds the app and its dispatchers). `configure_environment()` (BentoML's
    home, no telemetry) already ran at the top, before the imports that read it; it is idempotent:

    - adds the auth/error middleware (service/guard.py): who may call what, with tokens resolved once
      per process and generated into the home when neither the environment nor the home has them,
      so a bare `driftloop serve` is never open;
    - drops request content from BentoML's tracebacks (guard.install_log_redaction);
    - makes this worker die with BentoML's arbiter, its parent (core/lifecycle.py): an orphaned
      worker would go on serving the port, unmanaged, after a kill -9 of the server;
    - declares every endpoint's media type: BentoML 1.4 otherwise works out each response's mime
      type by generating the output model's JSON schema on every response (`IOMixin.mime_type` when
      `media_type` is unset): py-spy put it at ~9 % of the event loop's time at 32 concurrent clients.
    """
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is not None and main_spec.name == "_bentoml_impl.worker.service":  # a worker, not a test importing us
        die_with_parent_now(signal.SIGTERM)
    rules: dict[str, tokens.Kind] = {"/feedback": "feedback", "/admin/": "admin"}
    if settings.require_predict_token:
        rules.update({"/predict": "predict", "/explain": "predict"})
    service.add_asgi_middleware(guard.Guard, rules=rules, secrets=tokens.require(sorted(set(rules.values()))),
                                spec=lambda: service.openapi_spec.asdict(), json_paths=[a.route for a in service.apis.values()],
                                extra_responses={"/feedback": {422: "A label the model does not know"}})
    guard.install_log_redaction()
    for api in service.apis.values():
        if api.output_spec.media_type is None:
            api.output_spec.media_type = "application/json"


install()
