"""Bearer-token auth: the tokens themselves, the real service (/feedback, /admin/*, optionally
/predict), quiet logs, the controller's admin API, and the controller's report endpoint."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO, cli_json
from tests.service_helpers import Server

# ---------------------------------------------------------------- core/tokens.py


@pytest.fixture()
def token_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("DRIFTLOOP_HOME", str(home))
    for kind in ("feedback", "admin", "predict"):
        monkeypatch.delenv(f"DRIFTLOOP_{kind.upper()}_TOKEN", raising=False)
    return home


def test_ensure_generates_a_private_token_once_and_the_environment_wins(token_home, monkeypatch):
    from core import tokens

    assert tokens.get("feedback") is None
    assert tokens.ensure("feedback") is True
    assert tokens.ensure("feedback") is False  # never regenerated
    path = token_home / "secrets" / "feedback.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    generated = tokens.get("feedback")
    assert generated == path.read_text().strip() and len(generated) >= 40
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind
    monkeypatch.setenv("DRIFTLOOP_FEEDBACK_TOKEN", "from-the-environment-0123")
    assert tokens.get("feedback") == "from-the-environment-0123"
    assert tokens.ensure("admin") is True and tokens.get("admin") != generated  # one token per kind
    monkeypatch.setenv("DRIFTLOOP_ADMIN_TOKEN", "short")
    with pytest.raises(Exception, match="at least 16"):
        tokens.get("admin")
    monkeypatch.setenv("DRIFTLOOP_ADMIN_TOKEN", "from-the-environment-0123")
    with pytest.raises(Exception, match="the same"):
        tokens.require(["feedback", "admin"])


def test_concurrent_ensure_agrees_on_one_token(token_home):
    """Several processes (service workers) racing to create the token: exactly one wins, all read it."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from core import tokens; "
            "print(int(tokens.ensure('admin')), tokens.get('admin'))")
    env = {**os.environ, "DRIFTLOOP_HOME": str(token_home)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(REPO)], env=env, stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert sum(int(created) for created, _ in outs) == 1
    assert len({token for _, token in outs}) == 1


def test_up_prints_a_generated_token_once_then_only_its_path(token_home, monkeypatch):
    from core import tokens
    from driftloop.stack import ensure_tokens

    monkeypatch.delenv("DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN", raising=False)
    first: list[str] = []
    ensure_tokens(first.append)
    feedback, admin = tokens.get("feedback"), tokens.get("admin")
    assert any(feedback in line and "shown only now" in line for line in first)
    assert any(admin in line for line in first)
    again: list[str] = []
    ensure_tokens(again.append)
    assert again and not any(feedback in line or admin in line for line in again)
    assert any(str(tokens.token_path("feedback")) in line for line in again)
    assert not (token_home / "secrets" / "predict.token").exists()  # only when /predict needs one
    monkeypatch.setenv("DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN", "true")
    with_predict: list[str] = []
    ensure_tokens(with_predict.append)
    assert any(tokens.get("predict") in line and "shown only now" in line for line in with_predict)


@pytest.mark.parametrize("env, message", [
    ({"DRIFTLOOP_FEEDBACK_TOKEN": "short"}, "at least 16"),
    ({"DRIFTLOOP_FEEDBACK_TOKEN": "one-token-for-both-0123", "DRIFTLOOP_ADMIN_TOKEN": "one-token-for-both-0123"}, "the same"),
])
def test_serve_refuses_bad_tokens_with_one_line(home, env, message):
    from tests.conftest import run_cli

    proc = run_cli(["serve", "--port", "3999"], home, timeout=120, env=env)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]


@pytest.mark.parametrize("header, expected", [
    (None, 401), ("", 401), ("Bearer", 401), ("Bearer   ", 401), ("Basic dXNlcjpwYXNz", 401), ("Token right-token-0123456789", 401),
    ("Bearer wrong-token-0123456789", 403), ("Bearer right-token-012345678", 403), ("Bearer right-token-01234567890", 403),
    ("Bearer right-token-0123456789", None), ("bearer right-token-0123456789", None), ("  Bearer  right-token-0123456789 ", None),
])
def test_check(header, expected):
    from core import tokens

    assert tokens.check("right-token-0123456789", header) == expected


# ---------------------------------------------------------------- the real service


DISTINCT_TEXT = "zyzzogeton quixotic marmalade 7f3a"
WRONG_TOKEN = "wrong-token-d1st1nct-4242"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("auth") / "home"
    home.mkdir()
    cli_json(["train", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "120", "--quiet", "--set", "report=false"], home)
    server = Server(home).wait_ready()
    yield server
    server.stop()


def _post(server: Server, path: str, body: dict | None = None, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{server.url}{path}", json=body if body is not None else {}, headers=headers, timeout=30)


def test_feedback_and_admin_need_their_own_tokens(served):
    fb, admin = served.feedback_token, served.admin_token
    body = {"request_id": "f" * 32, "label": "positive"}
    for path, right, wrong_kind in (("/feedback", fb, admin), ("/admin/reload", admin, fb)):
        payload = body if path == "/feedback" else {}
        missing = _post(served, path, payload)
        assert missing.status_code == 401, missing.text
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in missing.json()["error"]
        wrong = _post(served, path, payload, WRONG_TOKEN)
        assert wrong.status_code == 403 and wrong.headers["www-authenticate"].startswith("Bearer")
        assert WRONG_TOKEN not in wrong.text  # never echoed
        assert _post(served, path, payload, wrong_kind).status_code == 403  # the feedback token opens no admin endpoint
        basic = httpx.post(f"{served.url}{path}", json=payload, headers={"Authorization": f"Basic {right}"}, timeout=30)
        assert basic.status_code == 401
    assert _post(served, "/feedback", body, fb).status_code == 404  # past auth: an unknown request id
    reloaded = _post(served, "/admin/reload", {}, admin)
    assert reloaded.status_code == 200 and reloaded.json()["status"] == "unchanged"
    assert _post(served, "/admin/anything", {}, fb).status_code == 403  # all of /admin/ is the admin's, even unknown paths
    assert _post(served, "/predict", {"texts": ["open by default"]}).status_code == 200
    assert _post(served, "/explain", {"text": "open by default"}).status_code == 200


def test_openapi_document_declares_the_bearer_schemes(served):
    doc = httpx.get(f"{served.url}/docs.json", timeout=10).json()
    schemes = doc["components"]["securitySchemes"]
    assert {name: s["scheme"] for name, s in schemes.items()} == {"adminToken": "bearer", "feedbackToken": "bearer"}
    assert doc["paths"]["/feedback"]["post"]["security"] == [{"feedbackToken": []}]
    assert doc["paths"]["/admin/reload"]["post"]["security"] == [{"adminToken": []}]
    assert "security" not in doc["paths"]["/predict"]["post"]
    assert {"401", "403"} <= set(doc["paths"]["/feedback"]["post"]["responses"])


def test_no_token_or_request_text_in_the_logs(served):
    """The real server's log at INFO (access lines included) after requests that carry a distinctive
    text and token, accepted and refused ones alike: neither appears."""
    fb, admin = served.feedback_token, served.admin_token
    ok = _post(served, "/predict", {"texts": [DISTINCT_TEXT]})
    assert ok.status_code == 200
    rid = ok.json()[0]["request_id"]
    assert _post(served, "/predict", {"texts": [DISTINCT_TEXT + " " + "x" * 5001]}).status_code == 400  # too long: a validation error
    assert _post(served, "/predict", {"texts": DISTINCT_TEXT}).status_code == 400  # wrong type: pydantic would quote it
    assert _post(served, "/explain", {"text": (DISTINCT_TEXT + " ") * 20}).status_code == 400  # too many words
    assert _post(served, "/explain", {"text": DISTINCT_TEXT}).status_code == 200
    assert _post(served, "/feedback", {"request_id": rid, "label": DISTINCT_TEXT}, fb).status_code == 422  # an unknown label
    assert _post(served, "/feedback", {"request_id": rid, "label": "positive"}, fb).status_code == 200
    assert _post(served, "/feedback", {"request_id": rid, "label": "positive"}, WRONG_TOKEN).status_code == 403
    assert _post(served, "/feedback", {"request_id": DISTINCT_TEXT, "label": "positive", "items": []}, fb).status_code == 400
    assert _post(served, "/admin/reload", {}, admin).status_code == 200
    time.sleep(0.5)  # let the access log lines reach the file
    log = served.log_path.read_text()
    assert "path=/feedback" in log and "status=422" in log and "Exception on /predict" in log  # INFO lines and client errors are logged
    for secret in (DISTINCT_TEXT, "zyzzogeton", fb, admin, WRONG_TOKEN):
        assert secret not in log, secret


def test_predict_token_option_and_generated_tokens(tmp_path, served):
    """No token variables: `driftloop serve` generates them into the home (0600, path printed, token
    not); with DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN /predict and /explain need the predict token."""
    home = served.home
    env = {"DRIFTLOOP_FEEDBACK_TOKEN": "", "DRIFTLOOP_ADMIN_TOKEN": "", "DRIFTLOOP_SERVICE_REQUIRE_PREDICT_TOKEN": "true"}
    server = Server(home, env=env).wait_ready()
    try:
        secrets = home / "secrets"
        generated = {kind: (secrets / f"{kind}.token").read_text().strip() for kind in ("feedback", "admin", "predict")}
        for kind in generated:
            assert stat.S_IMODE((secrets / f"{kind}.token").stat().st_mode) == 0o600
        assert len(set(generated.values())) == 3
        text = {"texts": ["needs a token now"]}
        assert _post(server, "/predict", text).status_code == 401
        assert _post(server, "/predict", text, generated["feedback"]).status_code == 403
        assert _post(server, "/predict", text, generated["predict"]).status_code == 200
        assert _post(server, "/explain", {"text": "needs a token"}).status_code == 401
        assert _post(server, "/explain", {"text": "needs a token"}, generated["predict"]).status_code == 200
        assert _post(server, "/admin/reload", {}, generated["admin"]).status_code == 200
        assert _post(server, "/feedback", {"request_id": "f" * 32, "label": "x"}, generated["feedback"]).status_code == 404
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200  # health stays open
        log = server.log_path.read_text()
        assert "generated the feedback token into" in log
        for token in generated.values():
            assert token not in log
    finally:
        server.stop()


def test_replay_sends_the_feedback_token_of_its_home(served, monkeypatch):
    from driftloop.replay import replay

    monkeypatch.setenv("DRIFTLOOP_FEEDBACK_TOKEN", served.feedback_token)
    stats = replay(served.url, [("the tent is great", "positive"), ("awful", "negative")], concurrency=2, feedback_fraction=1.0)
    assert stats.ok == 2 and stats.feedback_posted == 2 and stats.feedback_errors == 0
    monkeypatch.setenv("DRIFTLOOP_FEEDBACK_TOKEN", WRONG_TOKEN)
    refused = replay(served.url, [("fine", "positive")], feedback_fraction=1.0)
    assert refused.feedback_denied == 1 and refused.feedback_posted == 0
    explicit = replay(served.url, [("fine", "positive")], feedback_fraction=1.0,
                      headers={"Authorization": f"Bearer {served.feedback_token}"})  # explicit headers win
    assert explicit.feedback_posted == 1


# ---------------------------------------------------------------- the controller's admin API

ADMIN = "admin-api-token-0123456789"


def _fake_model(name: str) -> str:
    """A registered model with a lineage but no weights: it passes registry.get, not the load check."""
    from core import registry

    return registry.register(name, lambda directory, tag: (directory / "config.json").write_text("{}"),
                             {"label_names": ["negative", "positive"], "base_model": "none"})


@pytest.fixture()
def admin(db_url):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from core.statedb import get_engine
    from loop.admin_api import admin_routes
    from loop.refine_jobs import RefineJobs

    engine = get_engine()
    jobs = RefineJobs()
    with TestClient(Starlette(routes=admin_routes(engine, token=ADMIN, jobs=jobs))) as client:
        yield client, engine, jobs


def _admin(client, path: str, body=None, token: str | None = ADMIN, raw: bytes | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return client.post(path, content=raw, headers={**headers, "content-type": "application/json"})
    return client.post(path, json=body if body is not None else {}, headers=headers)


def test_admin_api_needs_the_admin_token(admin):
    client, _, _ = admin
    for path in ("/admin/retrain", "/admin/promote", "/admin/rollback"):
        r = _admin(client, path, token=None)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer") and r.json()["error"]
        assert _admin(client, path, token="a-feedback-token-0123456789").status_code == 403
        assert _admin(client, path, token="Bearer").status_code == 403


def test_admin_promote_and_rollback_with_the_cli_checks(admin):
    from core import alias, audit

    client, engine, _ = admin
    first, second = _fake_model("admin-api-test"), _fake_model("admin-api-test")
    assert _admin(client, "/admin/rollback").status_code == 409  # nothing promoted yet
    missing = _admin(client, "/admin/promote", {"model_version": "admin-api-test:doesnotexist"})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    unloadable = _admin(client, "/admin/promote", {"model_version": first})
    assert unloadable.status_code == 422 and "not promoted, production unchanged" in unloadable.json()["error"]
    assert alias.current(engine=engine) is None  # refused: production unchanged
    for tag in (first, second):
        ok = _admin(client, "/admin/promote", {"model_version": tag, "force": True, "reason": "test"})
        assert ok.status_code == 200 and ok.json()["tag"] == tag
    assert _admin(client, "/admin/promote", {"model_version": second, "force": True}).status_code == 409  # already production
    assert _admin(client, "/admin/rollback", {"to": "admin-api-test:doesnotexist"}).status_code == 404
    back = _admin(client, "/admin/rollback", {"reason": "test"})
    assert back.status_code == 200 and back.json()["tag"] == first and back.json()["rolled_back_from"] == second
    assert alias.current(engine=engine).tag == first
    kinds = [(e["kind"], e.get("actor")) for e in audit.history(engine, limit=5)]
    assert kinds[:3] == [("rollback", "admin-api"), ("promotion", "admin-api"), ("promotion", "admin-api")]


@pytest.mark.parametrize("raw, message", [
    (b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b'"text"', "JSON object"),
    (b"{}", "model_version: Field required"), (b'{"model_version": ""}', "model_version"),
    (b'{"model_version": "m:1", "extra": 1}', "extra"), (b'{"model_version": 5}', "model_version"),
])
def test_admin_bad_bodies_are_400_with_a_message(admin, raw, message):
    client, _, _ = admin
    r = _admin(client, "/admin/promote", raw=raw)
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_admin_retrain_starts_one_refinement_at_a_time(admin, monkeypatch):
    from core import alias, audit
    from loop import refine_jobs

    client, engine, jobs = admin
    assert _admin(client, "/admin/retrain").status_code == 409  # no production model
    alias.promote("m:1", engine=engine)
    assert _admin(client, "/admin/retrain", raw=b"[]").status_code == 400
    done = '{"challenger": null, "promoted": false}'
    monkeypatch.setattr(refine_jobs, "refine_command", lambda *a, **k: [sys.executable, "-c", f"import time; time.sleep(1.0); print('{done}')"])
    started = _admin(client, "/admin/retrain", {"reason": "on demand"})
    assert started.status_code == 202 and started.json() == {"started": True, "champion": "m:1"}
    busy = _admin(client, "/admin/retrain")
    assert busy.status_code == 409 and "already running" in busy.json()["error"]
    deadline = time.time() + 30
    while jobs.running() and time.time() < deadline:
        time.sleep(0.1)
    assert not jobs.running()
    policy = audit.last(engine, "policy")
    assert policy["actor"] == "admin-api" and "on demand" in policy["reason"]


def test_admin_retrain_on_a_standby_controller_is_refused(db_url):
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from core import alias
    from core.statedb import get_engine
    from loop.admin_api import admin_routes
    from loop.refine_jobs import RefineJobs

    engine = get_engine()
    alias.promote("m:1", engine=engine)
    jobs = RefineJobs()
    with TestClient(Starlette(routes=admin_routes(engine, token=ADMIN, is_leader=lambda: False, jobs=jobs))) as client:
        r = _admin(client, "/admin/retrain")
    assert r.status_code == 409 and "standby" in r.json()["error"] and not jobs.running()


# ---------------------------------------------------------------- the controller's reports


@pytest.mark.parametrize("path", [
    "/reports/..%2Fstate.db", "/reports/..%2fstate.db", "/reports/%2e%2e%2fstate.db", "/reports/%2E%2E%2Fstate.db",
    "/reports/..%252Fstate.db", "/reports/..%5Cstate.db", "/reports/monitor-1.html%2F..%2F..%2Fstate.db",
    "/reports/..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/reports/%2Fetc%2Fpasswd", "/reports/state.db", "/reports/monitor-1.html%00",
    "/reports/monitor-1.html%0A", "/reports/monitor-..html",
])
def test_reports_endpoint_serves_only_report_files(tmp_path, monkeypatch, path):
    from starlette.testclient import TestClient

    from core.statedb import get_engine
    from loop.controller import MetricsRefresher, build_app

    home = tmp_path / "home"
    (home / "reports").mkdir(parents=True)
    monkeypatch.setenv("DRIFTLOOP_HOME", str(home))
    monkeypatch.setenv("DRIFTLOOP_DB_URL", f"sqlite:///{home / 'state.db'}")
    (home / "reports" / "monitor-1.html").write_text("<html>report one</html>")
    (home / "secrets").mkdir()
    (home / "secrets" / "admin.token").write_text("s3cret-admin-token-never-served")
    engine = get_engine()
    with TestClient(build_app(engine, MetricsRefresher(engine))) as client:
        assert client.get("/reports/monitor-1.html").text == "<html>report one</html>"  # real reports are served
        r = client.get(path)
        assert r.status_code == 404, (path, r.status_code, r.text[:200])
        assert "SQLite" not in r.text and "s3cret" not in r.text
