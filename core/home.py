"""Where driftloop keeps its state: ``DRIFTLOOP_HOME`` and everything under it.

Every file the platform writes (state DB, reports, runs, and the BentoML model store unless
``BENTOML_HOME`` is set) lives below one directory, so any run can be isolated by pointing
``DRIFTLOOP_HOME`` at a temporary directory.
"""

from __future__ import annotations

import os
from pathlib import Path


def driftloop_home() -> Path:
    """The state directory (``$DRIFTLOOP_HOME``, default ``~/.driftloop``), created on demand."""
    home = Path(os.environ.get("DRIFTLOOP_HOME", "~/.driftloop")).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def bentoml_home() -> Path:
    """The BentoML home: ``$BENTOML_HOME`` if set, else ``$DRIFTLOOP_HOME/bentoml``."""
    if os.environ.get("BENTOML_HOME"):
        return Path(os.environ["BENTOML_HOME"]).expanduser().resolve()
    return driftloop_home() / "bentoml"


def configure_environment() -> Path:
    """Point BentoML at our home before it is imported; returns the BentoML home.

    BentoML reads ``BENTOML_HOME`` once at import time, so this must run before ``import bentoml``
    (the CLI and the registry call it first).
    """
    home = bentoml_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(home)
    # Never reach a hub at run time unless the user opted in (HF model ids they have cached work).
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    return home


def state_db_url() -> str:
    """SQLAlchemy URL of the state DB: ``$DRIFTLOOP_DB_URL`` or SQLite under the home."""
    return os.environ.get("DRIFTLOOP_DB_URL") or f"sqlite:///{driftloop_home() / 'state.db'}"


def runs_dir() -> Path:
    """Scratch space for training runs (checkpoints); safe to delete when nothing runs."""
    path = driftloop_home() / "runs"
    path.mkdir(parents=True, exist_ok=True)
    return path
