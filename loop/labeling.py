"""The controller's side of label requests: the Label Studio sync job and its webhook.

`sync_job` (scheduled every `labels.sync_interval_s` when `labels.studio_url` is set) expires old
requests, sends pending ones to Label Studio and polls answers to those sent (labels/studio.py).
When Label Studio is down or slow the job fails fast, requests stay queued in the state DB, serving
and monitoring go on, and `/status` and `driftloop_labels_tool_up` say since when; the next sync
that reaches it catches up. `webhook` takes Label Studio's pushed answers, checked by a secret
header (its webhooks are not signed).
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging

from sqlalchemy.engine import Engine

from core import tokens
from core.statedb import get_engine
from labels import answers, studio
from labels.config import LabelsConfig
from monitoring import exporter

log = logging.getLogger("driftloop.labels")

_tool: dict = {"up": None, "down_since": None, "last_error": None, "last_sync": None, "last_result": None}


def tool_state() -> dict:
    return dict(_tool)


def _mark(up: bool, error: str | None = None) -> None:
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    if up:
        if _tool["up"] is False:
            log.info("Label Studio reachable again (down since %s): sending the queued requests", _tool["down_since"])
        _tool.update(up=True, down_since=None, last_error=None, last_sync=now)
    else:
        if _tool["up"] is not False:  # one line per change of state, not one per sync
            log.warning("Label Studio unreachable: label requests stay queued (%s)", error)
            _tool["down_since"] = now
        _tool.update(up=False, last_error=error)
    exporter.LABELS_TOOL_UP.set(1 if up else 0)


def sync_job(labels_config: dict, webhook_url: str | None = None) -> dict | None:
    """One sync round with Label Studio (APScheduler job: plain-data arguments)."""
    config = LabelsConfig.model_validate(labels_config)
    if not config.enabled or not config.studio_url:
        return None
    engine = get_engine()
    token = tokens.get("labelstudio")
    if token is None:
        _mark(False, f"no Label Studio token ({tokens.env_var('labelstudio')} or {tokens.token_path('labelstudio')})")
        return None
    secret = tokens.require(["labels"])["labels"] if webhook_url else None
    try:
        result = studio.sync(engine, studio.Studio(config.studio_url, token, timeout_s=10.0), config, webhook_url, secret)
    except studio.StudioUnavailable as err:
        exporter.LABELS_SYNC_ERRORS.inc()
        _mark(False, str(err).splitlines()[0][:300])
        return None
    _mark(True)
    _tool["last_result"] = result
    for status in ("recorded", "replaced", "unchanged", "skipped"):
        exporter.LABELS_ANSWERS.labels(status=status).inc(result.get(status, 0))
    return result


def webhook(engine: Engine, payload: object, secret_header: str | None) -> tuple[int, dict]:
    """(HTTP status, body) for one webhook call from Label Studio."""
    expected = tokens.get("labels")
    if expected is None or not secret_header or not hmac.compare_digest(secret_header.encode(), expected.encode()):
        return 401, {"error": f"missing or wrong {studio.SECRET_HEADER} header"}
    if not isinstance(payload, dict):
        return 400, {"error": "expected a JSON object (a Label Studio webhook payload)"}
    answer = studio.answer_from_webhook(payload)
    if answer is None:
        return 200, {"ignored": str(payload.get("action"))}
    applied = answers.apply(engine, [answer])
    for status in ("recorded", "replaced", "unchanged", "skipped"):
        exporter.LABELS_ANSWERS.labels(status=status).inc(getattr(applied, status))
    return 200, applied.to_json()
