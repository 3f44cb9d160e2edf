"""Serving runtimes (core/runtimes.py) on a tiny registered model: ONNX export, int8 and its
accuracy gate, one export for N workers, and a corrupt file refused while the old model serves."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from core import alias, registry, runtimes
from core.errors import DriftloopError
from core.inference import load_predictor
from finetune.config import load_config
from finetune.pipeline import train

TEXTS = ["the battery died after a week", "great value, works perfectly", "shares rose after the earnings call",
         "x", "terrible " * 200]


def _register(tiny_model_dir, seed: int = 0) -> str:
    cfg = load_config(None, {"data.path": "demo:reviews", "data.max_rows": 200, "model.base_model": str(tiny_model_dir),
                             "training.epochs": 1, "training.batch_size": 16, "training.learning_rate": 1e-3,
                             "training.seed": seed, "registry.promote": "never"})
    return train(cfg, quiet=True, progress=False).tag


@pytest.fixture(scope="module")
def tag(tiny_model_dir):
    return _register(tiny_model_dir)


def test_the_service_and_the_loop_default_to_the_same_runtime(monkeypatch):
    """The service's defaults are literals (its settings must not import torch); the loop reads core.runtimes'."""
    from service.settings import ServiceSettings

    for name in (runtimes.RUNTIME_ENV, runtimes.TOLERANCE_ENV):
        monkeypatch.delenv(name, raising=False)
    settings, choice = ServiceSettings(), runtimes.serving_choice()
    assert (settings.runtime, settings.int8_tolerance_pt) == (choice.runtime, choice.int8_tolerance_pt) == ("onnx", 0.5)
    monkeypatch.setenv(runtimes.RUNTIME_ENV, "onnx-int8")
    monkeypatch.setenv(runtimes.TOLERANCE_ENV, "0.25")
    assert ServiceSettings.from_env().runtime == runtimes.serving_choice().runtime == "onnx-int8"
    assert runtimes.serving_choice().int8_tolerance_pt == 0.25
    # without the variable, what the prediction log says served the model; a given runtime beats both
    monkeypatch.delenv(runtimes.RUNTIME_ENV)
    assert runtimes.serving_choice(observed="onnx-int8").runtime == "onnx-int8"
    assert runtimes.serving_choice("torch", observed="onnx-int8").runtime == "torch"
    monkeypatch.setenv(runtimes.RUNTIME_ENV, "onnx")
    assert runtimes.serving_choice(observed="onnx-int8").runtime == "onnx"
    monkeypatch.setenv(runtimes.RUNTIME_ENV, "tensorrt")
    with pytest.raises(DriftloopError, match="unknown runtime 'tensorrt'"):
        runtimes.serving_choice()


def test_onnx_serves_what_torch_serves(tag):
    torch_pred = load_predictor(tag, device="cpu", precision="fp32")
    assert (torch_pred.runtime, torch_pred.runtime_note) == ("torch", None)  # every predictor says what computes it
    onnx_pred = runtimes.load_runtime_predictor(tag, "onnx", device="cpu")
    assert onnx_pred.runtime == "onnx" and onnx_pred.runtime_note is None
    a, b = torch_pred.predict(TEXTS), onnx_pred.predict(TEXTS)
    assert np.abs(a.probs - b.probs).max() < 1e-4
    assert np.abs(a.embeddings - b.embeddings).max() < 1e-4  # the monitor's embedding test sees the same vectors
    assert a.descriptors == b.descriptors and a.truncated == b.truncated == [False, False, False, False, True]
    manifest = runtimes.read_manifest(registry.get(tag))
    onnx_file = registry.get(tag).path / "runtimes" / "model.onnx"
    assert manifest["files"]["onnx"]["sha256"] == runtimes.sha256_of(onnx_file)


def test_int8_serves_only_within_its_tolerance(tag):
    int8 = runtimes.load_runtime_predictor(tag, "onnx-int8", device="cpu", int8_tolerance_pt=100)
    assert int8.runtime == "onnx-int8" and "accepted" in int8.runtime_note
    check = runtimes.read_manifest(registry.get(tag))["int8_check"]
    assert check["n"] == len(runtimes.held_out_rows(registry.get(tag))) > 0
    out = int8.predict(TEXTS)
    assert out.probs.shape == (len(TEXTS), 2) and np.isfinite(out.embeddings).all()
    # a tolerance that cannot be met (int8 would have to beat fp32 by 100 points): fp32 ONNX serves, and says why
    refused = runtimes.load_runtime_predictor(tag, "onnx-int8", device="cpu", int8_tolerance_pt=-100)
    assert refused.runtime == "onnx" and "onnx-int8 refused" in refused.runtime_note
    # tolerance 0 decides on the measured loss itself
    zero = runtimes.load_runtime_predictor(tag, "onnx-int8", device="cpu", int8_tolerance_pt=0)
    assert zero.runtime == ("onnx-int8" if check["accuracy_int8"] >= check["accuracy_fp32"] else "onnx")


def _log_served(engine, tag: str, predictor, texts: list[str]) -> None:
    """Log `texts` as the service does: computed by `predictor`, tagged with its runtime."""
    from core import predlog

    names = predictor.label_names
    out = predictor.predict(texts, batch_size=runtimes.REFERENCE_FORWARD_BATCH)  # the service's CPU forward passes
    rows = [predlog.LoggedPrediction(f"{predictor.runtime}-{i}", t, names[int(out.labels[i])], float(out.probs[i].max()),
                                     {n: float(out.probs[i, j]) for j, n in enumerate(names)}, out.descriptors[i],
                                     out.truncated[i], out.embeddings[i]) for i, t in enumerate(texts)]
    predlog.write_batch(engine, tag, rows, runtime=predictor.runtime)


def test_int8_traffic_is_tested_against_a_reference_profiled_with_int8(tag, db_url):
    """Stable traffic served by int8 (the reference's own texts, in forward passes of the service's CPU
    size, as the reference was made: int8's activation scales depend on the batch): the monitor tests
    it against the reference the int8 graph computes, which matches it exactly (p = 1, no verdict).
    The PyTorch-profiled reference does not match the same texts as int8 serves them: the confidence
    test sees two different samples (p < 1; 0.57 in one run). On this tiny random model that is no
    drift verdict; on the real MiniLM it is one (p = 0.0047 over 1,000 stable requests,
    bench/runtime_drift.py), which is why each runtime gets its own reference."""
    from core import predlog, profile
    from core.statedb import get_engine
    from monitoring import window
    from monitoring.analysis import Reference, run_pass
    from monitoring.config import MonitorConfig
    from monitoring.passes import monitor_once

    model = registry.get(tag)
    int8 = runtimes.load_runtime_predictor(tag, "onnx-int8", device="cpu", int8_tolerance_pt=100)
    assert int8.runtime == "onnx-int8"
    texts = profile.load(model.path)[0]["text"].tolist()
    engine = get_engine(db_url)
    predlog.ensure_schema(engine)
    _log_served(engine, tag, int8, texts)
    config = MonitorConfig(report=False, min_samples=10)

    stored = monitor_once(engine, config, model_version=tag)
    assert stored.result.reference["runtime"] == "onnx-int8" and stored.result.status == "ok"
    assert stored.result.drift is False
    p_int8 = {t.name: t.p_value for t in stored.result.tests}
    assert p_int8["confidence"] > 0.999 and p_int8["prob_positive"] > 0.999, p_int8
    # kept with its checksums, made from the int8 file that serves
    manifest = runtimes.read_manifest(model)
    assert manifest["references"]["onnx-int8"]["source_sha256"] == manifest["files"]["onnx-int8"]["sha256"]
    # the PyTorch reference of the same texts is not what int8 serves
    win = window.load(engine, tag, model.lineage["label_names"], last=1000)
    assert win.runtime == "onnx-int8"
    torch_ref = Reference.load(tag, "torch")
    assert np.abs(torch_ref.frame["confidence"].to_numpy() - Reference.load(tag, "onnx-int8").frame["confidence"].to_numpy()).max() > 1e-4
    p_torch = {t.name: t.p_value for t in run_pass(torch_ref, win, config).tests}
    assert p_int8["confidence"] == p_int8["prob_positive"] == 1.0  # int8's own reference is exactly its traffic
    assert p_torch["confidence"] < 1.0 and p_torch["prob_positive"] < 1.0, p_torch  # the PyTorch profile is another sample


def test_a_changed_runtime_reference_is_refused(tag, db_url):
    from monitoring.analysis import Reference

    Reference.load(tag, "onnx")
    parquet = registry.get(tag).path / "runtimes" / runtimes.REFERENCE_FILES["onnx"][0]
    parquet.write_bytes(parquet.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DriftloopError, match="reference profile does not match"):
        Reference.load(tag, "onnx")


def _ensure(tag: str, queue) -> None:
    model = registry.get(tag)
    queue.put(runtimes.ensure_files(model, "onnx-int8")["files"])


def test_n_workers_export_once(tiny_model_dir):
    tag = _register(tiny_model_dir, seed=1)
    ctx = multiprocessing.get_context("spawn")  # like BentoML's workers: fresh interpreters
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(tag, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    seen = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # every worker saw the same files, made once: one export time and one checksum each
    assert all(files == seen[0] for files in seen), seen
    assert set(seen[0]) == {"onnx", "onnx-int8"}


def test_a_corrupt_onnx_file_is_refused_and_the_old_model_keeps_serving(tiny_model_dir, db_url):
    from service.model_holder import ModelHolder
    from service.settings import ServiceSettings

    old, new = _register(tiny_model_dir, seed=2), _register(tiny_model_dir, seed=3)
    holder = ModelHolder(ServiceSettings(runtime="onnx", device="cpu", warmup_texts=2))
    alias.promote(old)
    assert holder.sync()["status"] == "swapped" and holder.current.predictor.runtime == "onnx"
    runtimes.ensure_files(registry.get(new), "onnx")
    onnx_file = registry.get(new).path / "runtimes" / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\x00" * 64
    onnx_file.write_bytes(bytes(data))
    alias.promote(new)
    result = holder.sync()
    assert result["status"] == "refused" and "sha256" in result["error"]
    assert holder.current.tag == old  # still serving, on its own runtime
    with pytest.raises(DriftloopError, match="sha256"):
        runtimes.load_runtime_predictor(new, "onnx", device="cpu")
    # a file that matches its checksum but does not load is refused too
    shutil.copy(onnx_file, onnx_file.with_suffix(".bak"))
    onnx_file.write_bytes(b"not an onnx graph")
    manifest = runtimes.read_manifest(registry.get(new))
    manifest["files"]["onnx"]["sha256"] = runtimes.sha256_of(onnx_file)
    runtimes._write_manifest(registry.get(new), manifest)
    with pytest.raises(DriftloopError, match="does not load in ONNX Runtime"):
        runtimes.load_runtime_predictor(new, "onnx", device="cpu")


def test_the_service_serves_int8_with_two_workers_and_says_so(tmp_path, tiny_model_dir):
    """The real server on `onnx-int8`: two workers start together (one export), answer, log, and show
    the runtime on /model and /metrics."""
    import httpx

    from tests.conftest import cli_json
    from tests.service_helpers import Server

    home = tmp_path / "home"
    home.mkdir()
    tag = cli_json(["train", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "120", "--quiet"], home)["model"]
    server = Server(home, workers=2, env={"DRIFTLOOP_SERVICE_RUNTIME": "onnx-int8", "DRIFTLOOP_SERVICE_INT8_TOLERANCE_PT": "100"})
    try:
        server.wait_ready()
        r = httpx.post(f"{server.url}/predict", json={"texts": TEXTS[:3]}, timeout=60)
        assert r.status_code == 200 and all(p["model_version"] == tag for p in r.json()), r.text
        m = httpx.post(f"{server.url}/model", json={}, timeout=10).json()
        assert m["runtime"] == "onnx-int8" and m["runtime_asked"] == "onnx-int8" and "accepted" in m["runtime_note"]
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        assert f'driftloop_serving_runtime_info{{model_version="{tag}",runtime="onnx-int8"}} 1.0' in metrics
        for _ in range(6):  # both workers answer on the same, checked files
            assert httpx.post(f"{server.url}/model", json={}, timeout=10).json()["runtime"] == "onnx-int8"
    finally:
        server.stop()
    env = {k: v for k, v in os.environ.items() if k not in ("BENTOML_HOME", "DRIFTLOOP_DB_URL")}
    env["DRIFTLOOP_HOME"] = str(home)
    manifest = json.loads(subprocess.run([sys.executable, "-c", "import json; from core import registry, runtimes; "
                                          f"print(json.dumps(runtimes.read_manifest(registry.get({tag!r}))))"],
                                         env=env, capture_output=True, text=True, check=True).stdout)
    assert set(manifest["files"]) == {"onnx", "onnx-int8"} and manifest["int8_check"]["n"] > 0


def test_a_model_the_exporter_cannot_handle_serves_on_torch_and_says_why(tiny_model_dir, monkeypatch):
    tag = _register(tiny_model_dir, seed=4)

    def unsupported(*_a, **_k):
        raise RuntimeError("unsupported operator in this architecture")

    monkeypatch.setattr(runtimes, "export_onnx", unsupported)
    predictor = runtimes.load_runtime_predictor(tag, "onnx", device="cpu")
    assert predictor.runtime == "torch" and "onnx export failed (RuntimeError: unsupported operator" in predictor.runtime_note
    assert predictor.predict(TEXTS).probs.shape == (len(TEXTS), 2)
    assert "files" not in runtimes.read_manifest(registry.get(tag))  # nothing half-made was recorded
