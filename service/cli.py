"""`driftloop serve`: the BentoML server on the production model."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer

from core import tokens
from core.errors import DriftloopError
from core.home import bentoml_home, driftloop_home
from core.lifecycle import die_with_parent, ensure_port_free
from core.statedb import sqlite_synchronous
from service.settings import PREFIX, ServiceSettings


def serve_command(
    port: int = typer.Option(3000, help="HTTP port."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 to expose)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes, each with its own model copy."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    runtime: Optional[str] = typer.Option(None, help="torch | onnx | onnx-int8 (accuracy-gated; see README 'Serving')."),
    store_text: Optional[bool] = typer.Option(None, "--store-text/--hash-text", help="Log texts, or only their sha256."),
    require_predict_token: Optional[bool] = typer.Option(
        None, "--require-predict-token/--open-predict", help="Make /predict and /explain need the predict token too."),
) -> None:
    """Serve the production model over HTTP (BentoML, adaptive batching, durable prediction log).

    /feedback and /admin/* need bearer tokens (DRIFTLOOP_FEEDBACK_TOKEN, DRIFTLOOP_ADMIN_TOKEN, or the
    files in $DRIFTLOOP_HOME/secrets, generated here when missing).
    """
    flags = {"workers": workers, "device": device, "runtime": runtime, "store_text": store_text, "require_predict_token": require_predict_token}
    for key, value in flags.items():
        if value is not None:
            os.environ[PREFIX + key.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    settings = ServiceSettings.from_env()  # fail fast, one line, on a bad setting
    sqlite_synchronous()  # the state DB's commit policy too: here, not as a traceback in every worker
    if not 0 < port < 65536:
        raise DriftloopError(f"--port must be between 1 and 65535, got {port}")
    kinds: list[tokens.Kind] = ["feedback", "admin"] + (["predict"] if settings.require_predict_token else [])
    for kind in kinds:  # generated here, once, rather than raced by the workers; the service's output is a log: no secrets in it
        if tokens.ensure(kind):
            typer.echo(f"generated the {kind} token into {tokens.token_path(kind)} (0600): "
                       f"clients send 'Authorization: Bearer <its content>'", err=True)
    tokens.require(kinds)
    bentoml_bin = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if bentoml_bin is None:
        raise DriftloopError("the bentoml command is not installed in this environment")
    if not is_loopback(host) and not settings.require_predict_token:
        typer.echo(f"warning: {host}:{port} is reachable beyond this machine and /predict and /explain are open to anyone "
                   "who reaches it; add --require-predict-token (clients then send the predict token)", err=True)
    ensure_port_free(port, host, "driftloop serve")
    root = Path(__file__).resolve().parent.parent
    os.environ["BENTOML_HOME"] = str(private_bentoml_home(port))
    args = [bentoml_bin, "serve", "service.service:Classifier", "--port", str(port), "--host", host, "--working-dir", str(root)]
    raise typer.Exit(supervise(args))


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, assume it is reachable


def supervise(args: list[str]) -> int:
    """Run BentoML's server as a child that dies with this process (kill -9 included: the kernel sends
    it SIGTERM, and BentoML stops its workers, which also die with their arbiter: service.service),
    pass Ctrl-C and SIGTERM on to it, and return its exit status (128+N when signal N killed it)."""
    # its own process group: a Ctrl-C or a group SIGTERM reaches it once, forwarded from here
    child = subprocess.Popen(args, preexec_fn=die_with_parent(signal.SIGTERM), process_group=0)  # noqa: PLW1509 - see core.lifecycle

    def forward(sig, _frame) -> None:
        if child.poll() is None:
            child.send_signal(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    code = child.wait()
    return 128 - code if code < 0 else code  # killed by signal N: exit 128+N, as a shell reports it


def private_bentoml_home(port: int) -> Path:
    """A BentoML home for the server on this port, sharing the model store.

    `bentoml serve` wipes `$BENTOML_HOME/prometheus_multiproc_dir` at every start, so two servers on
    one home (two ports, a benchmark, parallel tests) corrupt each other's metrics. Each server gets
    its own home whose `models` (and `datasets`, `bentos`) link to the one shared store.
    """
    shared = bentoml_home()
    private = driftloop_home() / "servers" / f"port-{port}" / "bentoml"
    private.mkdir(parents=True, exist_ok=True)
    for name in ("models", "bentos", "datasets"):  # datasets: the rows a model's lineage points to (core/data_store.py)
        target, link = shared / name, private / name
        target.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.is_symlink() or link.is_file():
            link.unlink()
        elif link.exists():
            shutil.rmtree(link)
        link.symlink_to(target, target_is_directory=True)
    return private


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
