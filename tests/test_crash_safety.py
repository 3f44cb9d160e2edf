"""SIGKILL at any moment of `driftloop train` leaves no half model and an intact production alias."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import REPO, cli_json

REQUIRED = ("model.safetensors", "config.json", "tokenizer.json", "driftloop.json", "reference.parquet", "reference_embeddings.npy")


def _start(home: Path, tiny_model_dir: Path, epochs: int) -> subprocess.Popen:
    env = {**os.environ, "DRIFTLOOP_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("BENTOML_HOME", None)
    env.pop("DRIFTLOOP_DB_URL", None)
    args = [sys.executable, "-m", "driftloop", "train", "--base-model", str(tiny_model_dir), "--epochs", str(epochs),
            "--max-rows", "300", "--promote", "always", "--set", "training.evals_per_epoch=4"]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _store_is_consistent(home: Path) -> list[str]:
    """Every version directory in the store is a complete, loadable model; returns their tags."""
    root = home / "bentoml" / "models" / "driftloop-classifier"
    tags = []
    for version in sorted(p for p in root.glob("*") if p.is_dir()) if root.exists() else []:
        for name in REQUIRED:
            assert (version / name).is_file(), f"half model in the store: {version} lacks {name}"
        load_file(version / "model.safetensors")
        tags.append(f"driftloop-classifier:{version.name}")
    return tags


def test_sigkill_during_training_registers_nothing(home, tiny_model_dir):
    # A first, complete model is production; the killed run must not disturb it.
    first = cli_json(["train", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "100", "--quiet"], home)
    proc = _start(home, tiny_model_dir, epochs=40)
    deadline = time.time() + 120
    seen = ""
    while time.time() < deadline and "epoch" not in seen:  # an evaluation (and a checkpoint) has happened
        seen += proc.stderr.read(1) or ""
        if proc.poll() is not None:
            break
    assert "epoch" in seen, seen[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _store_is_consistent(home) == [first["model"]]
    listed = cli_json(["models", "list"], home)
    assert listed["production"] == first["model"] and len(listed["models"]) == 1


def test_sigkill_at_any_moment_leaves_a_consistent_store(home, tiny_model_dir):
    """Kill a short run at spread-out moments, including inside evaluation and registration."""
    started = time.perf_counter()
    probe = _start(home, tiny_model_dir, epochs=1)
    assert probe.wait(timeout=300) == 0, probe.stderr.read()[-2000:]
    duration = time.perf_counter() - started
    tags = _store_is_consistent(home)
    assert len(tags) == 1
    for fraction in (0.3, 0.6, 0.8, 0.9, 0.95, 0.99):
        proc = _start(home, tiny_model_dir, epochs=1)
        time.sleep(duration * fraction)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        tags = _store_is_consistent(home)
        prod = cli_json(["models", "list"], home)["production"]
        assert prod in tags  # the alias always names a complete model
