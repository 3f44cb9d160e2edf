"""`driftloop serve`: the BentoML server on the production model."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from finetune.errors import DriftloopError


def serve_command(
    port: int = typer.Option(3000, help="HTTP port."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 to expose)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes, each with its own model copy."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    store_text: Optional[bool] = typer.Option(None, "--store-text/--hash-text", help="Log texts, or only their sha256."),
) -> None:
    """Serve the production model over HTTP (BentoML, adaptive batching, durable prediction log)."""
    import shutil  # noqa: PLC0415

    from service.settings import PREFIX, ServiceSettings  # noqa: PLC0415

    for key, value in {"workers": workers, "device": device, "store_text": store_text}.items():
        if value is not None:
            os.environ[PREFIX + key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    ServiceSettings.from_env()  # fail fast, one line, on a bad setting
    if not 0 < port < 65536:
        raise DriftloopError(f"--port must be between 1 and 65535, got {port}")
    bentoml_bin = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if bentoml_bin is None:
        raise DriftloopError("the bentoml command is not installed in this environment")
    root = Path(__file__).resolve().parent.parent
    args = [bentoml_bin, "serve", "service.service:Classifier", "--port", str(port), "--host", host, "--working-dir", str(root)]
    os.execv(bentoml_bin, args)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
