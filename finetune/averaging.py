"""Weight-space averaging of a refined model with the model it started from (WiSE-FT).

A refinement fine-tunes the champion on a few hundred rows of a new domain. Its weights move far
enough to forget some of the old domain; the straight line between the champion's weights θ₀ and
the refined weights θ₁, θ(α) = θ₀ + α·(θ₁ − θ₀), usually keeps most of the gain at a fraction of
the forgetting (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"). Measured here on
SST-2 → financial news (docs/benchmarks.md): α = 1 gained 30.8 points on finance and lost 2.6 on
SST-2 test; α = 0.5 gained 29.7 and lost nothing (+0.7).

α is fixed (0.5 by default, the paper's recommendation) or picked among candidates on the
refinement's own validation split, ties going to the smaller α (closer to the champion); no data the
gate uses is looked at. Picking on that split favours α = 1 (the split holds fresh labels and
*training-split* rows of the old domain, where forgetting barely shows), so the loop's default is fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.inference import Predictor
from finetune.data import Split


@dataclass
class AveragingResult:
    alpha: float
    val_accuracy_by_alpha: dict[float, float]

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "val_accuracy_by_alpha": {str(a): round(v, 4) for a, v in self.val_accuracy_by_alpha.items()}}


def interpolate(model: torch.nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor], alpha: float) -> None:
    """Load θ₀ + α·(θ₁ − θ₀) into `model` in place (integer buffers such as position ids come from θ₁)."""
    mixed = {k: (start[k].to(v.device, v.dtype) + alpha * (v - start[k].to(v.device, v.dtype))) if v.is_floating_point() else v
             for k, v in end.items()}
    model.load_state_dict(mixed)


def _accuracy(model: torch.nn.Module, tokenizer, label_names: list[str], split: Split, max_length: int) -> float:
    predictor = Predictor(model, tokenizer, label_names, max_length=max_length)
    if not len(split):
        return 0.0
    out = predictor.predict(list(split.texts))
    return float((out.labels == np.asarray(split.labels)).mean())


def average_with_start(model: torch.nn.Module, start_state: dict[str, torch.Tensor], tokenizer, label_names: list[str],
                       val: Split, alphas: list[float], max_length: int = 128) -> AveragingResult:
    """Pick α by validation accuracy (ties → smaller α; one candidate: that α) and leave `model` holding θ(α)."""
    end = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores: dict[float, float] = {}
    was_training = model.training
    model.eval()
    for alpha in sorted(set(alphas)):
        interpolate(model, start_state, end, alpha)
        scores[alpha] = _accuracy(model, tokenizer, label_names, val, max_length)
    best = max(scores.items(), key=lambda kv: (round(kv[1], 6), -kv[0]))[0]
    interpolate(model, start_state, end, best)
    model.train(was_training)
    return AveragingResult(best, scores)
