"""`driftloop controller`: the APScheduler process that runs monitor passes and serves their results.

Jobs live in the state DB (APScheduler's SQLAlchemy job store), so a restarted controller picks up
its schedule; misfires coalesce into one run and a job never overlaps itself. Its HTTP port serves
`/metrics` (the monitor's gauges, refreshed from the newest stored pass at every scrape, whoever ran
it), `/status`, `/healthz`, and the reports: `/reports/latest` (stable URL for the dashboards) and
`/reports/monitor-<run id>.html`.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time

from pydantic import BaseModel, ConfigDict, Field

from finetune.home import state_db_url
from finetune.statedb import get_engine
from monitoring import exporter, runner, store
from monitoring.config import MonitorConfig
from monitoring.policy import PolicyConfig
from monitoring.refine import RefineConfig

log = logging.getLogger("driftloop.controller")
REPORT_NAME = re.compile(r"^monitor-\d+\.html$")
JOB_TABLE = "controller_jobs"


class ControllerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(3100, ge=1, le=65535)
    monitor_interval_s: float = Field(60.0, gt=0, description="Seconds between scheduled monitor passes.")
    monitor: MonitorConfig = MonitorConfig()
    policy: PolicyConfig = PolicyConfig()
    refine: RefineConfig = RefineConfig()


def monitor_job(monitor: dict, policy: dict | None = None, refine: dict | None = None) -> None:
    """The scheduled monitor pass, then the loop's policy on it (a module-level function: the
    persistent job store references it by name)."""
    from finetune.errors import DriftloopError  # noqa: PLC0415
    from monitoring import loop  # noqa: PLC0415

    engine = get_engine()
    try:
        stored = runner.monitor_once(engine, MonitorConfig.model_validate(monitor))
        if policy is not None:
            latest = stored.to_json()
            loop.after_pass(engine, latest, PolicyConfig.model_validate(policy), RefineConfig.model_validate(refine or {}))
    except DriftloopError as err:
        log.info("monitor pass skipped: %s", err)
    except Exception:
        exporter.PASSES.labels(outcome="error").inc()
        log.exception("monitor pass failed")
        raise


class MetricsRefresher:
    """Publishes the newest stored pass to the gauges, once per new run id."""

    def __init__(self, engine):
        self.engine = engine
        self.last_run_id: int | None = None
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            store.ensure_schema(self.engine)
            latest = store.latest(self.engine)
            if latest is None or latest["run_id"] == self.last_run_id:
                return
            if self.last_run_id is not None:  # count passes that happened since we last looked
                for row in store.recent(self.engine, limit=100):
                    if row["run_id"] <= self.last_run_id:
                        break
                    exporter.PASSES.labels(outcome=row["status"]).inc()
                    if row.get("duration_s") is not None:
                        exporter.PASS_DURATION.observe(row["duration_s"])
            self.last_run_id = latest["run_id"]
            finished = latest.get("finished_at")
            import datetime as dt  # noqa: PLC0415

            ts = dt.datetime.fromisoformat(finished).timestamp() if finished else time.time()
            consecutive = store.consecutive_drift(self.engine, latest["model_version"])
            exporter.publish(latest, ts, consecutive)


def build_app(engine, refresher: MetricsRefresher, scheduler=None):
    """The controller's HTTP app (Starlette: already installed with BentoML)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # noqa: PLC0415
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    async def metrics(_request):
        try:
            refresher.refresh()
        except Exception as err:  # noqa: BLE001 - a scrape must still answer; staleness is alerted on
            log.warning("metrics refresh failed: %s", err)
        return Response(generate_latest(exporter.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_request):
        return PlainTextResponse("ok")

    async def status(_request):
        latest = store.latest(engine)
        jobs = []
        if scheduler is not None:
            jobs = [{"id": j.id, "next_run_time": j.next_run_time.isoformat() if j.next_run_time else None} for j in scheduler.get_jobs()]
        from finetune import alias  # noqa: PLC0415
        from monitoring import audit, loop  # noqa: PLC0415

        prod = alias.current(engine=engine)
        return JSONResponse({"champion": prod.tag if prod else None, "last_monitor_pass": latest, "jobs": jobs,
                             "refine_running": loop.refine_running(), "recent_events": audit.history(engine, limit=10)})

    def _report(path):
        if path is None or not path.is_file():
            return PlainTextResponse("no monitor report yet: the first pass with enough predictions writes one", status_code=404)
        return FileResponse(path, media_type="text/html")

    async def latest_report(_request):
        for row in store.recent(engine, limit=50):
            if row.get("report_path"):
                from pathlib import Path  # noqa: PLC0415

                return _report(Path(row["report_path"]))
        return _report(None)

    async def report(request):
        name = request.path_params["name"]
        if not REPORT_NAME.match(name):  # only report files: no path traversal, no other files
            return PlainTextResponse("not a report name (expected monitor-<run id>.html)", status_code=404)
        return _report(runner.reports_dir() / name)

    return Starlette(routes=[
        Route("/metrics", metrics), Route("/healthz", healthz), Route("/status", status),
        Route("/reports/latest", latest_report), Route("/reports/{name}", report),
    ])


def build_scheduler(settings: ControllerSettings):
    """A background APScheduler whose jobs persist in the state DB."""
    from apscheduler.executors.pool import ThreadPoolExecutor  # noqa: PLC0415
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore  # noqa: PLC0415
    from apscheduler.schedulers.background import BackgroundScheduler  # noqa: PLC0415

    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=get_engine(), tablename=JOB_TABLE)},
        executors={"default": ThreadPoolExecutor(2)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": max(30, int(settings.monitor_interval_s))},
        timezone="UTC",
    )
    scheduler.add_job(monitor_job, "interval", seconds=settings.monitor_interval_s, id="monitor", name="monitor pass",
                      replace_existing=True, kwargs={"monitor": settings.monitor.model_dump(), "policy": settings.policy.model_dump(),
                                                     "refine": settings.refine.model_dump()})
    return scheduler


def run(settings: ControllerSettings) -> None:
    """Run the scheduler and the HTTP server until SIGINT/SIGTERM, then shut both down cleanly."""
    import uvicorn  # noqa: PLC0415

    engine = get_engine()
    store.ensure_schema(engine)
    scheduler = build_scheduler(settings)
    refresher = MetricsRefresher(engine)
    exporter.UP_SINCE.set(time.time())
    app = build_app(engine, refresher, scheduler)
    scheduler.start()
    log.info("controller: state DB %s, monitor every %ss, http://%s:%s", state_db_url(), settings.monitor_interval_s,
             settings.host, settings.port)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal against the handlers it
    # found: make those no-ops so control comes back here and the scheduler stops cleanly (exit 0).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        from monitoring import loop  # noqa: PLC0415

        loop.stop_refine()
        scheduler.shutdown(wait=True)
        log.info("controller stopped")
