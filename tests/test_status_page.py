"""The controller's page for people (loop/status_page.py): the serving model and its chain of
parents with the gate each passed, what the loop waits for, the audit trail with reasons; every
value escaped; /status still JSON for API clients."""

from __future__ import annotations

import datetime as dt

import pytest


def test_page_shows_the_chain_the_gate_and_the_reasons_and_renders_markup_inert(db_url, registered_tiny_model):
    from starlette.testclient import TestClient

    from core import audit, predlog, production
    from core.statedb import get_engine
    from loop.controller import MetricsRefresher, build_app
    from monitoring import store

    engine = get_engine(db_url)
    store.ensure_schema(engine)  # as the controller makes them at start
    predlog.ensure_schema(engine)
    production.promote(registered_tiny_model, reason="first <script>alert(1)</script>", actor="test", engine=engine, verify=False)
    audit.record(engine, "gate", registered_tiny_model, passed=True, reasons=[], fresh_n=80, champion_fresh_accuracy=0.7,
                 challenger_fresh_accuracy=0.9, p_value=0.00002, regression_n=700, regression_loss=0.004, regression_p_value=0.003,
                 parts=[{"part": "g0", "n": 640, "needed": 619, "tested": True, "shown": True, "p_value": 0.01,
                         "champion_accuracy": 0.9, "challenger_accuracy": 0.9},
                        {"part": "g1", "n": 60, "needed": 619, "tested": False, "harmed": False, "harm_p_value": 0.5,
                         "champion_accuracy": 0.8, "challenger_accuracy": 0.82}])
    audit.record(engine, "policy", registered_tiny_model, action="skip", reason="drift in 1 consecutive windows (< 2) <b>bold</b>")
    with TestClient(build_app(engine, MetricsRefresher(engine))) as client:
        page = client.get("/")
        as_browser = client.get("/status", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        as_api = client.get("/status")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert as_browser.headers["content-type"].startswith("text/html")
    assert as_api.headers["content-type"].startswith("application/json") and as_api.json()["champion"] == registered_tiny_model

    # markup from a reason is text, never markup
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    # the serving model, shortened, with the full tag on hover; its gate and per-part results; reasons; p-values readable
    name, version = registered_tiny_model.split(":")
    assert f'title="{registered_tiny_model}"' in html and f"{name}:{version[:8]}…" in html
    assert "part g1" in html and "too small for the margin (needs 619)" in html and "McNemar p=2.0e-05" in html
    assert "drift in 1 consecutive windows" in html and "first production model" in html
    assert "watching" in html and "UTC (" in html and " ago)" in html
    assert 'href="/reports/latest"' in html


@pytest.mark.parametrize(("accept", "html"), [
    ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", True),
    ("application/json", False), ("*/*", False), ("", False), ("application/json, text/html", False),
])
def test_only_browsers_get_html(accept, html):
    from loop.status_page import wants_html

    assert wants_html(accept) is html


def test_people_readable_values():
    from loop.status_page import age, pvalue, short_tag, when

    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.timezone.utc)
    assert when("2026-12-04T11:57:00+00:00", now) == "2026-12-04 11:57:00 UTC (3 min ago)"
    assert age(now + dt.timedelta(hours=2), now) == "in 2 h" and age(now - dt.timedelta(days=3), now) == "3 d ago"
    assert pvalue(0.0004) == "4.0e-04" and pvalue(0.25) == "0.250" and pvalue(None) == "-"
    assert short_tag("driftloop-classifier:o6rv4jxnukc56ax4") == "driftloop-classifier:o6rv4jxn…" and short_tag(None) == "-"


def test_a_periodic_condition_is_logged_once_per_change_not_every_tick(db_url, caplog):
    """With no production model (or slow traffic) the monitor job runs every few seconds: the
    controller's log says so once, and again only when the condition changes."""
    import logging

    from core import predlog
    from core.statedb import get_engine
    from loop import controller
    from monitoring import store

    engine = get_engine(db_url)
    predlog.ensure_schema(engine)  # as the controller makes them at start
    store.ensure_schema(engine)
    controller._skip_line.clear()
    with caplog.at_level(logging.INFO, logger="driftloop.controller"):
        for _ in range(4):
            controller.monitor_job({"min_new_predictions": 50})
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "monitor pass" in r.getMessage()]
    assert len(said) == 1 and "no production model" in said[0], said
