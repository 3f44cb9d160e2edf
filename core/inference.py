"""Batched inference that yields, from one forward pass, everything driftloop logs.

Calibrated probabilities, the pooled sentence embedding and the text descriptors all come from a
single tokenisation and a single forward pass: the service logs them per prediction, the reference
profile stores them per validation row, so live traffic and reference are measured identically.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from core import registry
from core.descriptors import describe
from core.errors import DriftloopError
from core.modeling import autocast_dtype, load_classifier, load_tokenizer, pick_device


@dataclass
class Predictions:
    """Outputs for N texts, in the order the texts were given."""

    logits: np.ndarray  # (N, K) float32, uncalibrated
    probs: np.ndarray  # (N, K) float32, softmax(logits / temperature)
    embeddings: np.ndarray  # (N, D) float32, mean-pooled last hidden state
    descriptors: list[dict[str, float]]
    truncated: list[bool]

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


class Predictor:
    """A classifier ready to predict: model, tokenizer, label names, temperature, device."""

    runtime: str = "torch"  # what computes the forward pass (core/runtimes.py sets its own)
    runtime_note: str | None = None  # why it is not the runtime asked for, if it is not

    def __init__(self, model, tokenizer, label_names: list[str], *, temperature: float = 1.0,
                 max_length: int = 128, device: torch.device | None = None, precision: str = "auto"):
        self.device = device or next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.amp_dtype = autocast_dtype(self.device, precision)
        self._init_text(tokenizer, label_names, temperature, max_length)

    def _init_text(self, tokenizer, label_names: list[str], temperature: float, max_length: int) -> None:
        """What every runtime shares: tokenisation, labels, calibration (core/runtimes.py reuses it)."""
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.temperature = float(temperature)
        self.max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
        self._n_special = tokenizer.num_special_tokens_to_add(pair=False)

    def _encode(self, texts: list[str]):
        """Tokenise once without truncation (for counts), then cut to max_length keeping the last special token."""
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        truncated, kept, descriptors = [], [], []
        unk = self.tokenizer.unk_token_id
        for text, seq in zip(texts, ids):
            n_tokens = max(len(seq) - self._n_special, 0)
            descriptors.append(describe(text, n_tokens, sum(1 for t in seq if t == unk) if unk is not None else 0))
            cut = len(seq) > self.max_length
            truncated.append(cut)
            kept.append(seq[: self.max_length - 1] + seq[-1:] if cut else seq)
        batch = self.tokenizer.pad({"input_ids": kept}, padding=True, return_tensors="pt")
        return batch, descriptors, truncated

    @torch.inference_mode()
    def forward(self, texts: list[str]) -> Predictions:
        """One padded batch (padded to its own longest text) through the model."""
        batch, descriptors, truncated = self._encode(texts)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        amp = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with amp:
            out = self.model(**batch, output_hidden_states=True)
        logits = out.logits.float()
        mask = batch["attention_mask"].unsqueeze(-1).to(out.hidden_states[-1].dtype)
        pooled = (out.hidden_states[-1] * mask).sum(1) / mask.sum(1).clamp(min=1)
        probs = torch.softmax(logits / self.temperature, dim=-1)
        return Predictions(
            logits=logits.cpu().numpy(),
            probs=probs.cpu().numpy(),
            embeddings=pooled.float().cpu().numpy(),
            descriptors=descriptors,
            truncated=truncated,
        )

    def predict(self, texts: list[str], batch_size: int = 64) -> Predictions:
        """Any number of texts: sorted by length into batches (little padding), returned in order."""
        if not texts:
            raise ValueError("predict() needs at least one text")
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        parts = [self.forward([texts[i] for i in order[s:s + batch_size]]) for s in range(0, len(texts), batch_size)]
        inverse = np.empty(len(order), dtype=int)
        inverse[order] = np.arange(len(order))
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])[inverse]  # noqa: E731
        flat = lambda name: [x for p in parts for x in getattr(p, name)]  # noqa: E731
        descriptors, truncated = flat("descriptors"), flat("truncated")
        return Predictions(
            logits=cat("logits"), probs=cat("probs"), embeddings=cat("embeddings"),
            descriptors=[descriptors[j] for j in inverse], truncated=[truncated[j] for j in inverse],
        )


# --------------------------------------------------------------------------- registered models


def load_predictor(tag: str, device: str = "auto", precision: str = "auto"):
    """Load a registered model ready for inference."""
    model = registry.get(tag)
    lin = model.lineage
    tokenizer = load_tokenizer(str(model.path))
    classifier = load_classifier(str(model.path), lin["label_names"])
    return Predictor(classifier, tokenizer, lin["label_names"], temperature=lin.get("temperature", 1.0),
                     max_length=lin.get("max_length", 128), device=pick_device(device), precision=precision)


CHECK_TEXTS = ["a short sentence to check that the model loads and answers.", "check " * 40]


def load_verified(tag: str, device: str = "auto", precision: str = "auto"):
    """Load a model and run one forward pass; a model that cannot serve raises one-line DriftloopError.

    Promotion and the refinement gate call this so a corrupt challenger (truncated or garbled
    weights, a missing tokenizer, NaN parameters) is refused *before* the production alias moves;
    the service would refuse it too, but only after the alias pointed at it.
    """
    try:
        predictor = load_predictor(tag, device=device, precision=precision)
        probs = np.asarray(predictor.predict(CHECK_TEXTS).probs)
        if probs.shape[0] != len(CHECK_TEXTS) or not np.isfinite(probs).all():
            raise ValueError("the check forward pass produced non-finite probabilities")
    except DriftloopError:
        raise
    except Exception as err:  # noqa: BLE001 - whatever the loader raises, the answer is "does not load"
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        raise DriftloopError(f"model {tag} does not load ({type(err).__name__}: {detail})") from None
    return predictor
