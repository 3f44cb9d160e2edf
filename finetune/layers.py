"""Layer freezing for transfer learning: freeze the bottom of the encoder, or unfreeze it gradually.

Training-only; the model class itself lives in core/modeling.py.
"""

from __future__ import annotations

from torch import nn

from core.errors import DriftloopError


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
