"""The real BentoML server (`driftloop serve` subprocess) on a tiny registered model."""

from __future__ import annotations

import concurrent.futures as cf
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import cli_json
from tests.service_helpers import Server

TEXTS = ["the laptop works perfectly", "the tent broke the second time I used it", "Lumen Bank issued a profit warning"]


def _rows(home: Path) -> int:
    with sqlite3.connect(home / "state.db") as conn:
        return conn.execute("select count(*) from predictions").fetchone()[0]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("svc") / "home"
    home.mkdir()
    first = cli_json(["train", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "120", "--quiet"], home)
    server = Server(home).wait_ready()
    yield {"home": home, "server": server, "url": server.url, "model": first["model"], "tiny": tiny_model_dir}
    server.stop()


def test_predict_logs_every_prediction(served):
    before = _rows(served["home"])
    r = httpx.post(f"{served['url']}/predict", json={"texts": TEXTS}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body) == 3
    for item in body:
        assert item["label"] in ("negative", "positive")
        assert set(item["scores"]) == {"negative", "positive"}
        assert abs(sum(item["scores"].values()) - 1) < 1e-4
        assert item["confidence"] == max(item["scores"].values())
        assert item["model_version"] == served["model"]
        assert len(item["request_id"]) == 32
    assert len({i["request_id"] for i in body}) == 3
    assert _rows(served["home"]) == before + 3  # committed before the answer


def test_model_endpoint_and_readiness(served):
    m = httpx.post(f"{served['url']}/model", json={}, timeout=10).json()
    assert m["model_version"] == served["model"] and m["label_names"] == ["negative", "positive"]
    assert httpx.get(f"{served['url']}/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize("payload, raw", [
    (None, b"{not json"),
    ({}, None),
    ({"texts": "just a string"}, None),
    ({"texts": []}, None),
    ({"texts": ["   "]}, None),
    ({"texts": [""]}, None),
    ({"texts": [123]}, None),
    ({"texts": ["x"] * 65}, None),
    ({"texts": ["x" * 5001]}, None),
])
def test_bad_input_is_4xx_with_a_message(served, payload, raw):
    before = _rows(served["home"])
    if raw is not None:
        r = httpx.post(f"{served['url']}/predict", content=raw, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = httpx.post(f"{served['url']}/predict", json=payload, timeout=30)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.text  # a readable message
    assert _rows(served["home"]) == before


def test_feedback_join_idempotence_and_errors(served):
    url = served["url"]
    auth = served["server"].auth("feedback")
    rid = httpx.post(f"{url}/predict", json={"texts": ["the camera is worth every penny"]}, timeout=30).json()[0]["request_id"]
    ok = httpx.post(f"{url}/feedback", json={"request_id": rid, "label": "positive"}, headers=auth, timeout=30)
    assert ok.status_code == 200 and ok.json()["results"][0]["status"] == "recorded"
    again = httpx.post(f"{url}/feedback", json={"items": [{"request_id": rid, "label": "positive"}]}, headers=auth, timeout=30)
    assert again.status_code == 200 and again.json()["results"][0]["status"] == "unchanged"
    unknown = httpx.post(f"{url}/feedback", json={"items": [{"request_id": "f" * 32, "label": "positive"}]}, headers=auth, timeout=30)
    assert unknown.status_code == 404 and unknown.json() == {"error": f"unknown request_id '{'f' * 32}'"}  # one JSON object
    meh = httpx.post(f"{url}/feedback", json={"items": [{"request_id": rid, "label": "meh"}]}, headers=auth, timeout=30)
    assert meh.status_code == 422 and "unknown label" in meh.json()["error"]
    for bad in ({"items": []}, {}, {"request_id": rid}, {"request_id": rid, "label": "positive", "items": [{"request_id": rid, "label": "positive"}]},
                {"request_id": None, "label": "positive"}, {"request_id": rid, "label": "positive", "items": None}):
        r = httpx.post(f"{url}/feedback", json=bad, headers=auth, timeout=30)
        assert r.status_code == 400, (bad, r.status_code, r.text)
        assert r.json()["error"]
    assert httpx.post(f"{url}/feedback", json={"request_id": rid, "label": "positive"}, timeout=30).status_code == 401
    with sqlite3.connect(served["home"] / "state.db") as conn:
        assert conn.execute("select feedback_label from predictions where request_id=?", (rid,)).fetchone()[0] == "positive"


def test_metrics_are_exported(served):
    httpx.post(f"{served['url']}/predict", json={"texts": TEXTS[:1]}, timeout=30)
    text = httpx.get(f"{served['url']}/metrics", timeout=10).text
    for name in ("driftloop_predictions_total", "driftloop_prediction_confidence_bucket", "driftloop_prediction_log_write_seconds_bucket",
                 "driftloop_model_loads_total", "driftloop_model_info", "driftloop_batch_size_bucket", "bentoml_service_request_total"):
        assert name in text, name
    assert f'model_version="{served["model"]}"' in text


def _train(home, tiny, promote="never"):
    return cli_json(["train", "--base-model", str(tiny), "--epochs", "1", "--max-rows", "100", "--quiet", "--promote", promote,
                     "--seed", str(int(time.time() * 1000) % 10_000)], home)["model"]


def test_hot_swap_under_concurrent_load_drops_nothing(served):
    url, home = served["url"], served["home"]
    new_tag = _train(home, served["tiny"])
    stop = threading.Event()
    seen: list[tuple[float, int, str]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as c:
            while not stop.is_set():
                r = c.post(f"{url}/predict", json={"texts": [TEXTS[i % 3]]})
                version = r.json()[0]["model_version"] if r.status_code == 200 else ""
                with lock:
                    seen.append((time.time(), r.status_code, version))

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        time.sleep(1.5)
        cli_json(["models", "promote", new_tag], home)
        deadline = time.time() + 60
        while time.time() < deadline:
            with lock:
                if sum(1 for _, _, v in seen[-20:] if v == new_tag) >= 20:
                    break
            time.sleep(0.2)
        stop.set()
        for f in futures:
            f.result()
    statuses = [s for _, s, _ in seen]
    versions = [v for _, _, v in seen]
    assert statuses and all(s == 200 for s in statuses), [s for s in statuses if s != 200][:5]
    old_tag = served["model"]
    assert versions[0] == old_tag  # load ran on the old model before the promotion
    assert versions[-1] == new_tag
    first_new = versions.index(new_tag)
    # After the first answer from the new model, at most in-flight batches still answer with the old one.
    assert sum(1 for v in versions[first_new:] if v != new_tag) <= 4
    served["model"] = new_tag


def test_failed_swap_keeps_the_old_model(served):
    url, home = served["url"], served["home"]
    serving = httpx.post(f"{url}/model", json={}, timeout=10).json()["model_version"]
    broken = _train(home, served["tiny"])
    weights = Path(cli_json(["models", "show", broken], home)["path"]) / "model.safetensors"
    weights.write_bytes(b"this is not a safetensors file")
    cli_json(["models", "promote", broken, "--force"], home)  # past the CLI's own load check: the service must refuse it too
    deadline = time.time() + 30
    info = {}
    while time.time() < deadline:
        info = httpx.post(f"{url}/model", json={}, timeout=10).json()
        if info.get("last_reload_error"):
            break
        time.sleep(0.3)
    assert info["model_version"] == serving and broken in info["last_reload_error"]
    r = httpx.post(f"{url}/predict", json={"texts": TEXTS}, timeout=30)
    assert r.status_code == 200 and {p["model_version"] for p in r.json()} == {serving}
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    failures = [line for line in metrics.splitlines() if line.startswith("driftloop_model_swap_failures_total")]
    assert failures and float(failures[0].split()[-1]) >= 1
    # Promoting a good model again heals the service.
    cli_json(["models", "rollback"], home)


def test_kill_9_after_acknowledged_predictions_loses_none(tmp_path, tiny_model_dir):
    """Also runs the service in hash-only mode: texts are not stored, their sha256 is."""
    home = tmp_path / "home"
    home.mkdir()
    cli_json(["train", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "100", "--quiet"], home)
    server = Server(home, env={"DRIFTLOOP_SERVICE_STORE_TEXT": "false"}).wait_ready()
    acked = []
    try:
        with httpx.Client(timeout=30) as c:
            for i in range(25):
                r = c.post(f"{server.url}/predict", json={"texts": TEXTS[: 1 + i % 3]})
                assert r.status_code == 200
                acked += [p["request_id"] for p in r.json()]
    finally:
        server.kill()
    with sqlite3.connect(home / "state.db") as conn:
        ids = [row[0] for row in conn.execute("select request_id from predictions")]
    assert len(acked) == 49 and sorted(ids) == sorted(acked)  # every acknowledged prediction, nothing else
    import hashlib

    with sqlite3.connect(home / "state.db") as conn:
        stored = conn.execute("select text, text_sha256 from predictions").fetchall()
    assert all(text is None for text, _ in stored)
    assert {h for _, h in stored} == {hashlib.sha256(t.encode()).hexdigest() for t in TEXTS}


def test_explain_attributes_words(served):
    r = httpx.post(f"{served['url']}/explain", json={"text": "the laptop works perfectly"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [a["token"] for a in body["attributions"]] == ["the", "laptop", "works", "perfectly"]
    assert body["label"] in ("negative", "positive") and 0.5 <= body["confidence"] <= 1
    assert all(abs(a["attribution"]) <= 1 for a in body["attributions"])
    too_many = httpx.post(f"{served['url']}/explain", json={"text": "word " * 65}, timeout=30)
    assert too_many.status_code == 400 and "at most 64" in too_many.text
    assert httpx.post(f"{served['url']}/explain", json={"text": "x" * 1001}, timeout=30).status_code == 400


def test_two_workers_share_one_log_and_sum_their_metrics(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    home.mkdir()
    first = cli_json(["train", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "100", "--quiet"], home)
    server = Server(home, workers=2).wait_ready()
    try:
        with cf.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: httpx.post(f"{server.url}/predict", json={"texts": [TEXTS[i % 3]]}, timeout=60).status_code,
                                  range(40)))
        assert codes == [200] * 40
        assert _rows(home) == 40
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        total = sum(float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith("driftloop_predictions_total{") and first["model"] in line)
        assert total == 40  # counted once each, across both worker processes
        second = _train(home, tiny_model_dir)
        cli_json(["models", "promote", second], home)
        deadline = time.time() + 60
        versions: set[str] = set()
        while time.time() < deadline:  # both workers swap: 20 answers in a row from the new model
            versions = {httpx.post(f"{server.url}/predict", json={"texts": ["ok"]}, timeout=30).json()[0]["model_version"] for _ in range(20)}
            if versions == {second}:
                break
            time.sleep(0.5)
        assert versions == {second}
    finally:
        server.stop()
