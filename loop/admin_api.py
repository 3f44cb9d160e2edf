"""The controller's admin endpoints: steer the loop by hand over HTTP, behind the admin token.

    POST /admin/retrain   {"reason"?}                        start a refinement now (409 if one runs)
    POST /admin/promote   {"model_version", "reason"?, "force"?}   point production at a registered model
    POST /admin/rollback  {"to"?, "reason"?}                  back to the model served before

They do what `driftloop retrain`, `driftloop models promote` and `driftloop rollback` do (the same
checks: the model must exist, be a driftloop model and load), record it in the audit trail, and
answer JSON: 2xx on success, 401/403 without the admin token, 400 for a bad body, 404 for an unknown
model, 409 when the state forbids it (a refinement running, nothing to roll back), 422 for a model
that does not load. `admin_routes(engine)` returns Starlette routes for the controller's app.
"""

from __future__ import annotations

import json
import logging
from typing import Awaitable, Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core import alias, audit, production, registry, tokens
from core.errors import DriftloopError
from loop.refine_config import RefineConfig
from loop.refine_jobs import RefineJobs

log = logging.getLogger("driftloop.admin")
ACTOR = "admin-api"


class RetrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(None, max_length=500)


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_version: str = Field(min_length=1, max_length=255)
    reason: str | None = Field(None, max_length=500)
    force: bool = Field(False, description="Skip the load check, like `driftloop models promote --force`.")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    to: str | None = Field(None, min_length=1, max_length=255)
    reason: str | None = Field(None, max_length=500)


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse(raw: bytes, model: type[BaseModel]) -> BaseModel:
    """A request body as `model`: an empty body means `{}`; anything else must be a JSON object."""
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise _Refused(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise _Refused(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors(include_input=False)[0]
        where = ".".join(map(str, first["loc"])) or "body"
        raise _Refused(400, f"{where}: {first['msg']}") from None


def admin_routes(engine: Engine, refine: RefineConfig | None = None, token: str | None = None,
                 is_leader: Callable[[], bool] | None = None, fence: Callable[[], object] | None = None,
                 jobs: RefineJobs | None = None) -> list:
    """The admin routes, for the controller's Starlette app. `refine` is the controller's
    RefineConfig (default: RefineConfig()); `token` defaults to the admin token of this home;
    `is_leader` (with two controllers): only the leader starts refinements, a standby answers 409;
    `fence()` gives the leader's term, carried by the refinements it starts. Promote and rollback are
    a person's decision, taken on any controller: they carry no term. `jobs`: the controller's
    refinement jobs (one at a time; default: the routes' own)."""
    refinements = jobs or RefineJobs()
    secret = token or tokens.require(["admin"])["admin"]
    refine_config = refine or RefineConfig()

    def endpoint(work: Callable[[bytes], tuple[int, dict]]) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def handle(request: Request) -> JSONResponse:
            denied = tokens.check(secret, request.headers.get("authorization"))
            if denied is not None:
                body, headers = tokens.refusal("admin", denied)
                return JSONResponse(body, status_code=denied, headers=headers)
            raw = await request.body()
            try:
                status, body = await run_in_threadpool(work, raw)
            except _Refused as err:
                return JSONResponse({"error": str(err)}, status_code=err.status)
            return JSONResponse(body, status_code=status)
        return handle

    def retrain(raw: bytes) -> tuple[int, dict]:
        req = _parse(raw, RetrainRequest)
        if is_leader is not None and not is_leader():
            raise _Refused(409, "this controller is a standby: send the request to the leader (see /status)")
        prod = alias.current(engine=engine)
        if prod is None:
            raise _Refused(409, "no production model to refine: train and promote one first")
        if refinements.running():
            raise _Refused(409, "a refinement is already running; follow it with `driftloop history`")
        reason = f"manual: POST /admin/retrain{f' ({req.reason})' if req.reason else ''}"
        if not refinements.start(engine, refine_config, "manual", prod.tag, fence=fence() if fence is not None else None):
            raise _Refused(409, "a refinement is already running; follow it with `driftloop history`")
        audit.record(engine, "policy", prod.tag, action="retrain", reason=reason, dry_run=False, actor=ACTOR)
        log.info("admin: refinement of %s started", prod.tag)
        return 202, {"started": True, "champion": prod.tag}

    def promote(raw: bytes) -> tuple[int, dict]:
        req = _parse(raw, PromoteRequest)
        reason = req.reason or "manual promotion (POST /admin/promote)"
        try:
            tag = registry.get(req.model_version).tag
        except DriftloopError as err:
            raise _Refused(404, str(err)) from None
        try:
            tag = production.verified_tag(tag, req.force)
        except DriftloopError as err:
            raise _Refused(422, str(err)) from None
        try:  # audited with the move; not counted in the controller's promotion metrics (those count its own decisions)
            state = production.promote(tag, reason=reason, actor=ACTOR, engine=engine, verify=False)
        except DriftloopError as err:
            raise _Refused(409, str(err)) from None
        log.info("admin: production -> %s (was %s)", state.tag, state.previous_tag)
        return 200, state.to_json()

    def rollback(raw: bytes) -> tuple[int, dict]:
        req = _parse(raw, RollbackRequest)
        to = None
        if req.to is not None:
            try:
                to = registry.get(req.to).tag
            except DriftloopError as err:
                raise _Refused(404, str(err)) from None
        reason = req.reason or "manual rollback (POST /admin/rollback)"
        before = alias.current(engine=engine)
        try:
            state = production.rollback(to=to, reason=reason, actor=ACTOR, engine=engine)
        except DriftloopError as err:
            raise _Refused(409, str(err)) from None
        log.info("admin: production -> %s (rolled back from %s)", state.tag, before.tag if before else None)
        return 200, {**state.to_json(), "rolled_back_from": before.tag if before else None}

    return [Route("/admin/retrain", endpoint(retrain), methods=["POST"]),
            Route("/admin/promote", endpoint(promote), methods=["POST"]),
            Route("/admin/rollback", endpoint(rollback), methods=["POST"])]
