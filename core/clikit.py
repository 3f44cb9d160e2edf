"""What every stage's CLI verbs share: `--json` output and `--set KEY=VALUE` overrides.

Each stage contributes its verbs (finetune/cli.py, service/cli.py, monitoring/cli.py, loop/cli.py)
to the one `driftloop` command (driftloop/cli.py); these helpers keep their conventions alike.
"""

from __future__ import annotations

import contextlib
import json
import sys

import yaml

from core.errors import DriftloopError


def emit_json(obj) -> None:
    """One JSON object on the real stdout (library chatter is sent to stderr meanwhile)."""
    sys.__stdout__.write(json.dumps(obj, default=str) + "\n")
    sys.__stdout__.flush()


@contextlib.contextmanager
def machine_output(enabled: bool):
    """With --json, keep stdout for the one JSON object: everything else printed goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def set_options(raw_sets: list[str] | None) -> dict:
    """`--set training.weight_decay=0.1` for any key (values parsed as YAML scalars)."""
    out = {}
    for item in raw_sets or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DriftloopError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out
