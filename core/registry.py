"""The model registry: BentoML's model store plus driftloop's lineage files.

A registered model is a BentoML model whose directory holds the HF weights and tokenizer, the
lineage (``driftloop.json``), the reference profile for monitoring and the training report.
``bentoml.models.create`` writes into a temporary directory that only enters the store when the
block exits without error, so a crash or SIGKILL during registration leaves no half model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DriftloopError
from core.home import configure_environment

LINEAGE_FILE = "driftloop.json"
REPORT_FILE = "report.html"
MODULE = "driftloop"


def _bentoml():
    configure_environment()
    import bentoml  # noqa: PLC0415 - must follow configure_environment()

    return bentoml


def _metadata_safe(value: Any) -> Any:
    """BentoML metadata takes basic types only and no None: drop Nones, recurse into containers."""
    if isinstance(value, dict):
        return {str(k): _metadata_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_metadata_safe(v) for v in value if v is not None]
    return value


@dataclass
class RegisteredModel:
    tag: str
    path: Path
    lineage: dict
    creation_time: str

    def to_json(self, full: bool = False) -> dict:
        lin = self.lineage
        out = {
            "tag": self.tag,
            "created": self.creation_time,
            "parent": lin.get("parent"),
            "base_model": lin.get("base_model"),
            "labels": lin.get("label_names"),
            "temperature": lin.get("temperature"),
            "metrics": {split: {k: v for k, v in m.items() if k in ("n", "accuracy", "f1_macro", "ece", "roc_auc")}
                        for split, m in lin.get("metrics", {}).items()},
            "path": str(self.path),
        }
        if full:
            out["lineage"] = lin
        return out


def register(name: str, write_files: Callable[[Path, str], None], lineage: dict, labels: dict[str, str] | None = None) -> str:
    """Create a model in the store; `write_files(dir, tag)` fills its directory. Returns the tag.

    The lineage is both BentoML metadata (for `bentoml models get`) and a JSON file (full fidelity).
    """
    bentoml = _bentoml()
    with bentoml.models.create(name, labels=labels or {}, metadata=_metadata_safe(lineage), module=MODULE) as model:
        directory = Path(model.path)
        tag = str(model.tag)
        write_files(directory, tag)
        (directory / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2, default=str), encoding="utf-8")
    return tag


def get(tag: str) -> RegisteredModel:
    """Look a model up by tag (`name:version`, or `name` for its newest version)."""
    bentoml = _bentoml()
    try:
        model = bentoml.models.get(tag)
    except Exception as err:  # bentoml raises NotFound, BentoMLException or ValueError for bad tags
        raise DriftloopError(f"model {tag!r} not found in the model store ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    path = Path(model.path)
    lineage_path = path / LINEAGE_FILE
    if not lineage_path.is_file():
        raise DriftloopError(f"{model.tag} is not a driftloop model (no {LINEAGE_FILE})")
    try:
        lineage = json.loads(lineage_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DriftloopError(f"{model.tag} has an unreadable {LINEAGE_FILE}: {err}") from None
    return RegisteredModel(str(model.tag), path, lineage, model.info.creation_time.isoformat())


def list_models(name: str | None = None) -> list[RegisteredModel]:
    """Every driftloop model in the store (newest first), optionally of one name."""
    bentoml = _bentoml()
    out = []
    for model in bentoml.models.list(name) if name else bentoml.models.list():
        if model.info.module != MODULE:
            continue
        try:
            out.append(get(str(model.tag)))
        except DriftloopError:
            continue
    return sorted(out, key=lambda m: m.creation_time, reverse=True)


def delete(tag: str) -> None:
    _bentoml().models.delete(tag)


def export(tag: str, target: Path) -> Path:
    """Copy a model's directory out of the store (e.g. to start a refinement from it)."""
    model = get(tag)
    shutil.copytree(model.path, target, dirs_exist_ok=True)
    return target
