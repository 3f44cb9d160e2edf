"""The controller's upkeep job: retention of the prediction log and of the monitor's own history.

Scheduled by the leading controller every `retention.interval_s` (loop/controller.py); what it
keeps and why is core/retention.py's. The loop adds what only it knows: an unfinished bake needs
the new champion's rows since its promotion whole (the previous champion must re-score their
texts), so those rows are held for as long as the bake has not decided. A running refinement
holds its own rows (loop/refine.py). Monitor passes and their HTML reports older than
`retention.days` go too: one pass a minute is 43,000 rows and reports a month.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path

from sqlalchemy.engine import Engine

from core import alias, predlog, retention
from core.retention import Hold, RetentionConfig
from core.statedb import get_engine
from loop.bake import in_bake
from monitoring import exporter, store

log = logging.getLogger("driftloop.upkeep")

_last: dict = {}  # the last run's summary, for /status


def bake_holds(engine: Engine) -> list[Hold]:
    """A hold on the serving model's rows since its promotion while its bake has not decided."""
    current = alias.current(engine=engine)
    promo = in_bake(engine, current.tag) if current is not None else None
    if promo is None:
        return []
    first = predlog.first_id_at(engine, dt.datetime.fromisoformat(promo["at"]))
    return [Hold(current.tag, first if first is not None else predlog.max_id(engine) + 1,
                 f"bake of {current.tag} (promoted {promo['at']}) has not decided")]


def run_retention(engine: Engine, config: RetentionConfig, now: dt.datetime | None = None) -> dict:
    """One retention run over the log, the monitor passes and the reports; returns its summary."""
    now = now or dt.datetime.now(dt.timezone.utc)
    result = retention.run(engine, config, now=now, extra_holds=bake_holds(engine))
    store.ensure_schema(engine)
    passes, reports = store.prune_before(engine, now - dt.timedelta(days=config.days))
    for path in reports:
        Path(path).unlink(missing_ok=True)
    return {**result.to_json(), "monitor_passes_deleted": passes, "reports_deleted": len(reports),
            "finished_at": now.isoformat()}


_said = {"off": False}


def retention_job(retention_config: dict) -> dict:
    """The scheduled job (a module-level function with plain-data arguments: APScheduler's
    persistent job store pickles them)."""
    engine = get_engine()
    config = RetentionConfig.model_validate(retention_config)
    if not config.enabled:
        if not _said["off"]:  # once, not at every run
            log.info("retention is off (retention.enabled=false): the prediction log keeps every row")
            _said["off"] = True
        return {}
    _said["off"] = False
    try:
        summary = run_retention(engine, config)
    except Exception:
        exporter.RETENTION_RUNS.labels(outcome="error").inc()
        log.exception("retention run failed")
        raise
    exporter.RETENTION_RUNS.labels(outcome="ok" if summary["finished"] else "partial").inc()
    exporter.RETENTION_ROWS.labels(action="compacted").inc(summary["compacted"])
    exporter.RETENTION_ROWS.labels(action="deleted").inc(summary["deleted"])
    exporter.RETENTION_LAST.set(time.time())
    _last.clear()
    _last.update(summary)
    return summary


def last_run() -> dict | None:
    """This controller's last retention run (None before the first)."""
    return dict(_last) if _last else None
