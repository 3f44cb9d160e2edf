"""The classifier and how to load it: the mean-pooling head, loading, device and precision.

Shared by training (finetune/) and serving (service/): both build and load the same model class.
Which base model to start from is core/base_model.py (no torch import, for the configs); layer
freezing is training-only and lives in finetune/layers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer
from transformers.modeling_outputs import SequenceClassifierOutput

from core.errors import DriftloopError


def load_tokenizer(source: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise DriftloopError(f"cannot load tokenizer from {source!r}: {str(err).splitlines()[0]}") from None


HEAD_FILE = "driftloop_head.json"
HEAD_WEIGHTS = "driftloop_head.safetensors"


class MeanPoolClassifier(nn.Module):
    """Encoder + attention-masked mean pooling + linear head.

    Sentence-embedding encoders such as all-MiniLM-L6-v2 were trained with mean pooling, not with
    the [CLS] pooler that `AutoModelForSequenceClassification` uses. Measured on 4,000 SST-2 rows
    x 2 epochs (docs/benchmarks.md): the best [CLS]-head run reached 0.843 SST-2 test accuracy,
    this head 0.856 with the defaults. Saved as a plain HF encoder folder plus two head files.
    """

    accepts_loss_kwargs = False  # our loss is a per-batch mean: Trainer scales it for accumulation

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def base_model(self) -> nn.Module:
        return self.encoder

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states: bool = False, **_):
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=(hidden,) if output_hidden_states else None)

    def save_pretrained(self, directory, **kwargs) -> None:
        directory = Path(directory)
        self.encoder.save_pretrained(directory, **kwargs)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.classifier.state_dict().items()}, directory / HEAD_WEIGHTS)
        (directory / HEAD_FILE).write_text(json.dumps({"pooling": "mean", "num_labels": self.classifier.out_features,
                                                       "dropout": self.dropout_p}), encoding="utf-8")

    @classmethod
    def from_pretrained(cls, directory, encoder_config=None) -> "MeanPoolClassifier":
        directory = Path(directory)
        head = json.loads((directory / HEAD_FILE).read_text(encoding="utf-8"))
        encoder = AutoModel.from_pretrained(directory, config=encoder_config) if encoder_config else AutoModel.from_pretrained(directory)
        model = cls(encoder, head["num_labels"], head.get("dropout", 0.1))
        model.classifier.load_state_dict(load_file(directory / HEAD_WEIGHTS))
        return model


def _is_hf_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def load_classifier(source: str, label_names: list[str], dropout: float | None = None, pooling: str = "mean"):
    """A classifier on `source`: the saved head of a fine-tuned model, else a fresh head on the encoder.

    `pooling="mean"` puts a mean-pooling head on a bare encoder; `"cls"` uses transformers'
    `AutoModelForSequenceClassification` (the [CLS] pooler). Fine-tuned models keep their own kind.
    """
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
        head_file = Path(source) / HEAD_FILE
        if head_file.is_file():
            model = MeanPoolClassifier.from_pretrained(source, encoder_config=config)
            if model.classifier.out_features != len(label_names):
                raise DriftloopError(f"{source} has {model.classifier.out_features} labels, expected {len(label_names)}")
            return model
        if pooling == "cls" or _is_hf_classifier(config):
            return AutoModelForSequenceClassification.from_pretrained(source, config=config)
        head_dropout = dropout if dropout is not None else getattr(config, "hidden_dropout_prob", 0.1)
        return MeanPoolClassifier(AutoModel.from_pretrained(source, config=config), len(label_names), head_dropout)
    except (OSError, ValueError) as err:
        raise DriftloopError(f"cannot load model from {source!r}: {str(err).splitlines()[0]}") from None


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
