"""Weight averaging with the champion (WiSE-FT): the interpolation and the choice of alpha."""

from __future__ import annotations

import torch

from core.modeling import load_classifier, load_tokenizer
from finetune.averaging import average_with_start, interpolate
from finetune.data import Split


def _perturbed(model: torch.nn.Module, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: (v + scale * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def test_interpolate_reaches_both_ends_and_the_midpoint(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), ["neg", "pos"])
    start = {k: v.clone() for k, v in model.state_dict().items()}
    end = _perturbed(model, 0.1)
    key = next(k for k, v in start.items() if v.is_floating_point() and v.numel() > 1)
    for alpha, expected in ((0.0, start[key]), (1.0, end[key]), (0.5, (start[key] + end[key]) / 2)):
        interpolate(model, start, end, alpha)
        assert torch.allclose(model.state_dict()[key], expected, atol=1e-6)


def test_alpha_is_picked_on_validation_accuracy_with_ties_to_the_champion(tiny_model_dir):
    names = ["neg", "pos"]
    model = load_classifier(str(tiny_model_dir), names)
    tok = load_tokenizer(str(tiny_model_dir))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # the "refined" weights only rescale the head: every alpha > 0 predicts like the champion, so all tie
    head = {k: v.clone() for k, v in start.items()}
    for k in head:
        if k.startswith("classifier") and head[k].is_floating_point():
            head[k] = head[k] * 3
    model.load_state_dict(head)
    val = Split(["the laptop works perfectly", "the tent arrived damaged", "great value", "broke after a day"], [1, 0, 1, 0])
    result = average_with_start(model, start, tok, names, val, [1.0, 0.5, 0.25])
    assert set(result.val_accuracy_by_alpha) == {0.25, 0.5, 1.0}
    assert len(set(result.val_accuracy_by_alpha.values())) == 1  # argmax unchanged by scaling the head
    assert result.alpha == 0.25  # a tie goes to the weights closest to the champion
    for k, v in model.state_dict().items():  # the model is left holding the chosen mix
        if v.is_floating_point():
            assert torch.allclose(v, start[k] + 0.25 * (head[k] - start[k]), atol=1e-6)

    # a "refined" model that flips the head's decision wins when it is the only one that fits the labels
    flipped = {k: v.clone() for k, v in start.items()}
    for k in flipped:
        if k.startswith("classifier") and flipped[k].is_floating_point():
            flipped[k] = -flipped[k]
    model.load_state_dict(flipped)
    result = average_with_start(model, start, tok, names, val, [0.25, 1.0])
    acc = result.val_accuracy_by_alpha
    assert result.alpha == max(acc, key=lambda a: (acc[a], -a))
