"""Shared fixtures. Isolation first: every test session writes under its own temporary
DRIFTLOOP_HOME (set before anything imports bentoml), and CLI tests get their own home each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="driftloop-tests-"))
os.environ["DRIFTLOOP_HOME"] = str(SESSION_HOME)
os.environ.pop("BENTOML_HOME", None)
os.environ.pop("DRIFTLOOP_DB_URL", None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO = REPO / "finetune" / "demo_data"


def shared_data(relative: str) -> Path:
    """A file of ../shared/data: missing data fails the test in CI and skips it elsewhere."""
    path = SHARED_DATA / relative
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must provide ../shared/data")
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny random BERT whose vocabulary covers the demo data."""
    from tests import tiny_model

    corpus = []
    for name in ("reviews.tsv", "markets.tsv"):
        corpus += [line.split("\t")[0] for line in (DEMO / name).read_text(encoding="utf-8").splitlines()[1:]]
    return tiny_model.build(SESSION_HOME / "tiny-bert", corpus)


@pytest.fixture(scope="session")
def registered_tiny_model(tiny_model_dir) -> str:
    """A real registered model (tiny BERT, 1 epoch on 60 demo rows, not promoted) in this session's
    model store, for in-process tests that need one the store knows (label names, a rollback target)."""
    out = cli_json(["train", "--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "60", "--quiet",
                    "--set", "registry.promote=never", "--set", "report=false"], SESSION_HOME)
    return out["model"]


@pytest.fixture()
def home(tmp_path) -> Path:
    """A fresh DRIFTLOOP_HOME for one test (used by subprocess CLI tests)."""
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture()
def db_url(tmp_path, monkeypatch) -> str:
    """A fresh state DB for one in-process test."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    monkeypatch.setenv("DRIFTLOOP_DB_URL", url)
    return url


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL cluster on loopback for the whole session (tests/pg.py), stopped at the end even
    on failure. Missing server binaries fail the test in CI and skip it elsewhere (`make postgres`)."""
    from tests.pg import PostgresCluster, find_bin_dir

    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL server binaries not found: CI must install the Debian package 'postgresql' (make postgres)")
        pytest.skip("PostgreSQL not installed (make postgres, or apt-get install postgresql)")
    cluster = PostgresCluster(bin_dir).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def state_db_url(request, tmp_path, monkeypatch) -> str:
    """A fresh, empty state DB on each engine (SQLite file, or a new database on the session's
    Postgres), also set as DRIFTLOOP_DB_URL for code that opens the default engine."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_server").create_database()
    monkeypatch.setenv("DRIFTLOOP_DB_URL", url)
    yield url
    from core.statedb import dispose_engine

    dispose_engine(url)


def run_cli(args: list[str], home: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the real `driftloop` CLI in a subprocess with its own home (`env` may name a state DB URL)."""
    full_env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    full_env.pop("BENTOML_HOME", None)
    full_env.pop("DRIFTLOOP_DB_URL", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "driftloop", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


def cli_json(args: list[str], home: Path, **kw) -> dict:
    proc = run_cli([*args, "--json"], home, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)
