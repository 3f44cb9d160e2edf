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

    finetune_cli.register(app)


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
