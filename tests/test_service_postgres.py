"""The real server (`driftloop serve` subprocess) with its state DB on PostgreSQL (tests/pg.py).

Training promotes into Postgres, the service reads the production alias from there and writes its
prediction log there: predict, feedback (404, 422, idempotent) and kill -9 durability, as on SQLite.
"""

from __future__ import annotations

import httpx
from sqlalchemy import create_engine, select

from tests.conftest import cli_json
from tests.service_helpers import Server

TEXTS = ["the laptop works perfectly", "the tent broke the second time I used it", "Lumen Bank issued a profit warning"]


def test_service_on_postgres_predicts_takes_feedback_and_loses_nothing_on_kill_9(tmp_path, tiny_model_dir, postgres_server):
    from core import predlog
    from core.predlog import predictions

    url = postgres_server.create_database()
    home = tmp_path / "home"
    home.mkdir()
    trained = cli_json(["train", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "100", "--quiet",
                        "--promote", "always"], home, env={"DRIFTLOOP_DB_URL": url})
    engine = create_engine(url)
    server = Server(home, db_url=url).wait_ready()
    acked: list[str] = []
    try:
        with httpx.Client(timeout=30) as c:
            assert c.post(f"{server.url}/model", json={}).json()["model_version"] == trained["model"]  # the alias, read from Postgres
            r = c.post(f"{server.url}/predict", json={"texts": TEXTS})
            assert r.status_code == 200, r.text
            body = r.json()
            assert [p["model_version"] for p in body] == [trained["model"]] * 3
            acked += [p["request_id"] for p in body]

            rid = acked[0]
            fb = lambda payload: c.post(f"{server.url}/feedback", json=payload, headers=server.auth())  # noqa: E731
            assert fb({"request_id": rid, "label": "positive"}).json()["results"][0]["status"] == "recorded"
            assert fb({"items": [{"request_id": rid, "label": "positive"}]}).json()["results"][0]["status"] == "unchanged"
            assert fb({"items": [{"request_id": "f" * 32, "label": "positive"}]}).status_code == 404
            assert fb({"items": [{"request_id": rid, "label": "meh"}]}).status_code == 422

            for i in range(25):
                r = c.post(f"{server.url}/predict", json={"texts": TEXTS[: 1 + i % 3]})
                assert r.status_code == 200, r.text
                acked += [p["request_id"] for p in r.json()]
    finally:
        server.kill()  # SIGKILL of the whole server tree right after the last acknowledged answer
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(predictions.c.request_id, predictions.c.feedback_label, predictions.c.created_at,
                                       predlog.TEXT.label("text")).select_from(predlog.LOGGED)).all()
    finally:
        engine.dispose()
    assert len(acked) == 52 and sorted(r.request_id for r in rows) == sorted(acked)  # every acknowledged prediction, nothing else
    by_id = {r.request_id: r for r in rows}
    assert by_id[acked[0]].feedback_label == "positive" and by_id[acked[1]].feedback_label is None
    assert {r.text for r in rows} == set(TEXTS) and all(r.created_at.tzinfo is not None for r in rows)
    assert not (home / "state.db").exists()  # nothing went to the SQLite default instead
