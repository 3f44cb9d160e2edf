"""`driftloop controller`: the APScheduler process that runs monitor passes and serves their results.

Jobs live in the state DB (APScheduler's SQLAlchemy job store), so a restarted controller picks up
its schedule; misfires coalesce into one run and a job never overlaps itself. Its HTTP port serves
`/metrics` (the monitor's gauges, refreshed from the newest stored pass at every scrape, whoever ran
it), `/status`, `/healthz`, and the reports: `/reports/latest` (stable URL for the dashboards) and
`/reports/monitor-<run id>.html`.

Several controllers may run on one state DB (a standby for availability): every one serves HTTP,
but only the holder of the leader lease (loop/lease.py) runs the scheduler. A standby starts
its scheduler when it is elected (the leader died or stopped); a leader that loses the lease stops
its scheduler and any running refinement.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import ClassVar

import uvicorn
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.engine import make_url
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from core import alias, audit, predlog, retention, tokens
from core.errors import DriftloopError
from core.retention import RetentionConfig
from labels.config import LabelsConfig
from core.home import state_db_url
from core.statedb import get_engine
from loop import act, status_page
from loop.admin_api import admin_routes
from loop.bake import ShadowScorer, bake_status
from loop.lease import Fence, LeaderElector, Lease, LeaseSettings
from loop.lease import current as current_lease
from loop.policy import PolicyConfig
from loop.refine_config import RefineConfig
from loop.refine_jobs import RefineJobs
from labels import requests as label_requests
from labels.studio import SECRET_HEADER
from loop import labeling
from loop.labeling import sync_job
from loop.upkeep import last_run as last_retention_run
from loop.upkeep import retention_job
from monitoring import exporter, passes, store
from monitoring.config import MonitorConfig
from monitoring.verdict import Verdict

log = logging.getLogger("driftloop.controller")
REPORT_NAME = re.compile(r"^monitor-\d+\.html$")
JOB_TABLE = "controller_jobs"


class PageLinks(BaseModel):
    """Where the controller's page links to (`driftloop up` sets them for the stack it starts)."""

    model_config = ConfigDict(extra="forbid")

    prometheus: str | None = Field(None, description="Prometheus's alerts page, e.g. http://127.0.0.1:9090/alerts.")
    evidently: str | None = Field(None, description="Evidently UI's project page of the monitor.")


class ControllerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(3100, ge=1, le=65535)
    monitor_interval_s: float = Field(60.0, gt=0, description="Seconds between scheduled monitor passes.")
    monitor: MonitorConfig = MonitorConfig()
    policy: PolicyConfig = PolicyConfig()
    refine: RefineConfig = RefineConfig()
    retention: RetentionConfig = RetentionConfig()
    labels: LabelsConfig = LabelsConfig()
    lease: LeaseSettings = Field(default_factory=LeaseSettings)
    links: PageLinks = PageLinks()

    @model_validator(mode="after")
    def _consistent(self) -> "ControllerSettings":
        # 0 turns the policy's label guard off on purpose; a guard below what a refinement needs is a mistake
        if self.policy.mode != "manual" and 0 < self.policy.min_new_labels < self.refine.min_fresh_labels:
            raise ValueError(f"policy.min_new_labels {self.policy.min_new_labels} < refine.min_fresh_labels "
                             f"{self.refine.min_fresh_labels}: the policy would start refinements that refuse to run")
        if self.labels.enabled and self.policy.mode != "manual":
            if self.labels.confirm_max < self.policy.min_labels:
                raise ValueError(f"labels.confirm_max {self.labels.confirm_max} < policy.min_labels {self.policy.min_labels}: "
                                 "a confirmation sample could never confirm a drop on its own")
            if self.labels.per_refinement < self.refine.min_fresh_labels:
                raise ValueError(f"labels.per_refinement {self.labels.per_refinement} < refine.min_fresh_labels "
                                 f"{self.refine.min_fresh_labels}: a training batch could never start a refinement on its own")
        return self


class StateLine:
    """Logs a periodic condition once when it begins (and once when it changes), not at every tick:
    with slow traffic the monitor job said "monitor pass skipped" every 5 s for hours. `state` names
    the condition; the message may carry changing numbers without counting as a change."""

    def __init__(self, logger: logging.Logger):
        self.logger, self.state = logger, None
        self.lock = threading.Lock()

    def __call__(self, state: str, level: int, message: str, *args) -> None:
        with self.lock:
            changed, self.state = state != self.state, state
        self.logger.log(level if changed else logging.DEBUG, message, *args)

    def clear(self) -> None:
        with self.lock:
            self.state = None


_skip_line = StateLine(log)


def monitor_job(monitor: dict, policy: dict | None = None, refine: dict | None = None, holder: str | None = None,
                labels: dict | None = None) -> None:
    """The scheduled monitor pass, then the loop's policy on it.

    A module-level function with plain-data arguments because the persistent job store keeps the job
    by name and pickles its kwargs: `holder` names the controller (`Leadership`) of this process that
    scheduled it, which owns the refinement jobs and the bake's shadow model. A pass that was already
    running when that controller lost the lease still stores its pass, but does not act on it: no
    refinement from a demoted leader, and none from a call that names no controller.
    """
    engine = get_engine()
    exporter.MONITOR_JOBS.inc()
    config = MonitorConfig.model_validate(monitor)
    lead = Leadership.of(holder) if holder is not None else None
    try:
        version = passes.serving_version(engine)
        new = passes.new_since_last_verdict(engine, version, cap=config.min_new_predictions)
        if new is not None and new < config.min_new_predictions:
            # no new verdict on re-read rows; the policy still runs on the last one (late labels, schedule mode,
            # a cooldown that ended), and the drift streak cannot grow
            exporter.PASSES.labels(outcome="no_new_data").inc()
            _skip_line(f"waiting for predictions of {version}", logging.INFO,
                       "monitor passes wait: %s new predictions of %s since the last verdict (< %s); said again when this changes",
                       new, version, config.min_new_predictions)
            stored = store.latest(engine, version)
            stored = passes.with_fresh_labels(engine, config, stored) if stored is not None else None
        else:
            _skip_line.clear()
            stored = passes.monitor_once(engine, config, model_version=version).to_json()
        if stored is None or policy is None:
            return
        verdict = Verdict.from_json(stored)
        if lead is None or not lead.is_leader:
            log.warning("not the leader (any more): monitor pass %s stored, policy not applied", verdict.run_id)
        else:
            act.after_pass(engine, verdict, PolicyConfig.model_validate(policy), RefineConfig.model_validate(refine or {}),
                           lead.refinements, fence=lead.fence(), scorer=lead.shadow,
                           labels=LabelsConfig.model_validate(labels) if labels is not None else None)
    except DriftloopError as err:
        _skip_line(f"error: {err}", logging.INFO, "monitor pass skipped: %s (said again when this changes)", err)
    except Exception:
        exporter.PASSES.labels(outcome="error").inc()
        log.exception("monitor pass failed")
        raise


class MetricsRefresher:
    """Publishes the newest stored pass to the gauges, once per new run id, and the prediction log's
    size and age at every scrape (O(log n) reads: core/retention.stats)."""
    def __init__(self, engine, retention_config: RetentionConfig | None = None, labels_config: LabelsConfig | None = None):
        self.engine = engine
        self.retention = retention_config or RetentionConfig()
        self.labels = labels_config or LabelsConfig()
        self.last_run_id: int | None = None
        self.lock = threading.Lock()

    def refresh(self) -> None:
        with self.lock:
            self._refresh_passes()
            exporter.publish_log_stats(retention.stats(self.engine, self.retention))
            exporter.publish_labels(label_requests.summary(self.engine, self.labels))

    def _refresh_passes(self) -> None:
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
        ts = dt.datetime.fromisoformat(finished).timestamp() if finished else time.time()
        consecutive = store.consecutive_drift(self.engine, latest["model_version"])
        exporter.publish(latest, ts, consecutive)


class Leadership:
    """This controller's role and what it owns: the leader runs the scheduler (built fresh at each
    election: APScheduler cannot restart a scheduler it shut down) and the refinement jobs; a standby
    only serves HTTP until it is elected."""

    _running: ClassVar[dict[str, "Leadership"]] = {}  # by holder id: how a scheduled job finds its controller

    def __init__(self, engine, settings: ControllerSettings, holder: str | None = None):
        self.engine = engine
        self.settings = settings
        self.scheduler = None
        self._lock = threading.Lock()
        self.refinements = RefineJobs()  # at most one refinement, started by this controller's passes or admin API
        self.shadow = ShadowScorer()  # the bake's previous champion, kept between passes
        self.elector = LeaderElector(engine, settings.lease, holder=holder, on_elected=self._elected, on_demoted=self._demoted)

    @classmethod
    def of(cls, holder: str) -> "Leadership | None":
        """The started controller of this process with this holder id (None once it stopped)."""
        return cls._running.get(holder)

    @property
    def holder(self) -> str:
        return self.elector.holder

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader

    def fence(self) -> Fence | None:
        """This leader's term, for the production moves of the work it starts; None when not leading."""
        lease = self.elector.lease
        if not self.is_leader or lease is None:
            return None
        return Fence(lease.name, self.holder, lease.fencing)

    def _elected(self, held: Lease) -> None:
        with self._lock:
            exporter.LEADER.set(1)
            exporter.LEADER_CHANGES.labels(event="elected").inc()
            try:  # a refinement the previous leader left behind (it died) is recorded as failed
                self.refinements.recover_interrupted(self.engine)
            except Exception:  # noqa: BLE001 - recovery is best effort; the jobs must still run
                log.exception("recovering interrupted jobs failed")
            scheduler = build_scheduler(self.settings, holder=self.holder)
            scheduler.start()
            self.scheduler = scheduler
            log.info("leader (%s, fencing token %s): scheduler started", self.holder, held.fencing)

    def _demoted(self, reason: str) -> None:
        with self._lock:
            exporter.LEADER.set(0)
            exporter.LEADER_CHANGES.labels(event="demoted").inc()
            scheduler, self.scheduler = self.scheduler, None
            if scheduler is not None:
                scheduler.shutdown(wait=True)  # lets a running monitor pass finish (it will not act on it)
            # a refinement started just before the demotion may still be spawning its process: stop it too
            deadline = time.monotonic() + 60
            self.refinements.stop()
            while self.refinements.running() and time.monotonic() < deadline:
                time.sleep(0.2)
                self.refinements.stop()
            log.info("standby (%s): scheduler stopped (%s)", self.holder, reason)

    def start(self) -> "Leadership":
        Leadership._running[self.holder] = self
        self.elector.start()
        return self

    def stop(self) -> None:
        """Stop the scheduler and any refinement, then release the lease (a standby takes over at once)."""
        try:
            self.elector.stop(release_lease=True)
        finally:
            Leadership._running.pop(self.holder, None)

    def jobs(self) -> list[dict]:
        scheduler = self.scheduler
        if scheduler is None:
            return []
        return [{"id": j.id, "next_run_time": j.next_run_time.isoformat() if j.next_run_time else None} for j in scheduler.get_jobs()]

    def status(self) -> dict:
        try:
            held = current_lease(self.engine, self.settings.lease.name)
        except Exception as err:  # noqa: BLE001 - status must answer while the DB is away
            held = {"error": str(err).splitlines()[0]}
        return {"leader": self.is_leader, "holder": self.holder, "lease": held}


def status_snapshot(engine, settings: ControllerSettings, leadership: Leadership | None, refinements: RefineJobs) -> dict:
    """`GET /status` as JSON: who leads, what serves, the last pass, bake, labels, log, jobs, events."""
    latest = store.latest(engine)
    prod = alias.current(engine=engine)
    role = leadership.status() if leadership is not None else {"leader": None, "holder": None, "lease": None}
    return {**role, "champion": prod.tag if prod else None, "last_monitor_pass": latest,
            "bake": bake_status(engine, prod.tag, settings.policy) if prod else None,
            "labels": {**label_requests.summary(engine, settings.labels),
                       "tool": {"url": settings.labels.studio_url, **labeling.tool_state()}},
            "log": {**retention.stats(engine, settings.retention), "last_retention_run": last_retention_run()},
            "jobs": leadership.jobs() if leadership is not None else [],
            "refine_running": refinements.running(), "recent_events": audit.history(engine, limit=10)}


def status_html(engine, settings: ControllerSettings, snapshot: dict) -> str:
    """The operator's page (loop/status_page.py) for a status snapshot: the chain, waits, events, links."""
    events = audit.history(engine, limit=50)
    gates = {e["model_version"]: e for e in reversed(audit.history(engine, limit=500, kinds=("gate",)))}
    return status_page.render(snapshot, chain=status_page.lineage_chain(snapshot["champion"], gates), events=events,
                              links={"Prometheus alerts": settings.links.prometheus, "Evidently project": settings.links.evidently,
                                     "label queue": settings.labels.studio_url, "latest report": "/reports/latest",
                                     "metrics": "/metrics"},
                              policy=status_page.policy_view(engine, snapshot, settings.policy))


def report_routes(engine) -> list[Route]:
    """The monitor's HTML reports: the newest (a stable link for pages and alerts) and any by name."""
    def _report(path):
        if path is None or not path.is_file():
            return PlainTextResponse("no monitor report yet: the first pass with enough predictions writes one", status_code=404)
        return FileResponse(path, media_type="text/html")

    async def latest_report(_request):
        for row in store.recent(engine, limit=50):
            if row.get("report_path"):
                return _report(Path(row["report_path"]))
        return _report(None)

    async def report(request):
        name = request.path_params["name"]
        if not REPORT_NAME.match(name):  # only report files: no path traversal, no other files
            return PlainTextResponse("not a report name (expected monitor-<run id>.html)", status_code=404)
        return _report(passes.reports_dir() / name)

    return [Route("/reports/latest", latest_report), Route("/reports/{name}", report)]


def build_app(engine, refresher: MetricsRefresher, leadership: Leadership | None = None, refine: RefineConfig | None = None,
              admin_token: str | None = None):
    """The controller's HTTP app (Starlette: already installed with BentoML), with the admin routes
    (loop/admin_api.py: retrain, promote, rollback behind the admin token)."""
    refinements = leadership.refinements if leadership is not None else RefineJobs()
    settings = leadership.settings if leadership is not None else ControllerSettings()

    async def metrics(_request):
        try:
            refresher.refresh()
        except Exception as err:  # noqa: BLE001 - a scrape must still answer; staleness is alerted on
            log.warning("metrics refresh failed: %s", err)
        return Response(generate_latest(exporter.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_request):
        return PlainTextResponse("ok")

    def snapshot() -> dict:
        return status_snapshot(engine, settings, leadership, refinements)

    def page() -> str:
        return status_html(engine, settings, snapshot())

    async def status(request):
        if status_page.wants_html(request.headers.get("accept", "")):
            return HTMLResponse(await run_in_threadpool(page))
        return JSONResponse(await run_in_threadpool(snapshot))

    async def home(_request):
        return HTMLResponse(await run_in_threadpool(page))

    async def labels_webhook(request):
        try:
            payload = await request.json()
        except ValueError:
            payload = None
        code, body = await run_in_threadpool(labeling.webhook, engine, payload, request.headers.get(SECRET_HEADER))
        return JSONResponse(body, status_code=code)

    return Starlette(routes=[
        Route("/", home), Route("/metrics", metrics), Route("/healthz", healthz), Route("/status", status),
        Route("/labels/webhook", labels_webhook, methods=["POST"]), *report_routes(engine),
        *admin_routes(engine, refine=refine, token=admin_token, jobs=refinements,
                      is_leader=(lambda: leadership.is_leader) if leadership is not None else None,
                      fence=leadership.fence if leadership is not None else None),
    ])


def build_scheduler(settings: ControllerSettings, holder: str | None = None):
    """A background APScheduler whose jobs persist in the state DB; `holder` names the controller
    whose passes they are (see `monitor_job`)."""
    scheduler = BackgroundScheduler(
        jobstores={"default": SQLAlchemyJobStore(engine=get_engine(), tablename=JOB_TABLE)},
        executors={"default": ThreadPoolExecutor(2)},
        job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": max(30, int(settings.monitor_interval_s))},
        timezone="UTC",
    )
    scheduler.add_job(monitor_job, "interval", seconds=settings.monitor_interval_s, id="monitor", name="monitor pass",
                      replace_existing=True, kwargs={"monitor": settings.monitor.model_dump(), "policy": settings.policy.model_dump(),
                                                     "refine": settings.refine.model_dump(), "holder": holder,
                                                     "labels": settings.labels.model_dump()})
    # label requests go out and answers come in while Label Studio is configured (a no-op job otherwise)
    scheduler.add_job(sync_job, "interval", seconds=settings.labels.sync_interval_s, id="labels", name="label requests sync",
                      replace_existing=True, kwargs={"labels_config": settings.labels.model_dump(),
                                                     "webhook_url": f"http://{settings.host}:{settings.port}/labels/webhook"})
    # always scheduled (replacing a stored one): with retention.enabled false the job does nothing
    scheduler.add_job(retention_job, "interval", seconds=settings.retention.interval_s, id="retention", name="log retention",
                      replace_existing=True, kwargs={"retention_config": settings.retention.model_dump()},
                      next_run_time=dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=min(60.0, settings.retention.interval_s)))
    return scheduler


def run(settings: ControllerSettings) -> None:
    """Serve HTTP until SIGINT/SIGTERM, running the scheduler while this controller holds the leader
    lease; then shut down cleanly (scheduler, refinement, lease released for a standby)."""

    engine = get_engine()
    predlog.ensure_schema(engine)  # on Postgres also this week's day partitions, before any retention run
    store.ensure_schema(engine)
    audit.ensure_schema(engine)
    refresher = MetricsRefresher(engine, settings.retention, settings.labels)
    label_requests.ensure_schema(engine)
    if settings.labels.enabled and settings.labels.studio_url:
        tokens.ensure("labels")  # the webhook's secret header, shared with Label Studio when the sync registers it
    exporter.UP_SINCE.set(time.time())
    leadership = Leadership(engine, settings)
    app = build_app(engine, refresher, leadership, refine=settings.refine)
    log.info("controller %s: state DB %s, monitor every %ss, lease %r ttl %ss, http://%s:%s", leadership.holder,
             _safe_url(state_db_url()), settings.monitor_interval_s, settings.lease.name, settings.lease.ttl_s,
             settings.host, settings.port)
    leadership.start()
    if not leadership.is_leader:
        log.info("standby: another controller holds the lease; serving HTTP and waiting to be elected")
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal against the handlers it
    # found: make those no-ops so control comes back here and the scheduler stops cleanly (exit 0).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
    finally:
        leadership.stop()
        log.info("controller stopped")


def _safe_url(url: str) -> str:
    """The state DB URL without its password, for logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<unparseable URL>"
