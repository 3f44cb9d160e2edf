"""Training-toolbox tests on a tiny random BERT (seconds each)."""

import numpy as np
import pytest

from finetune.config import load_config
from finetune.data import prepare
from finetune.training import auto_class_weights, fit


def _config(tiny_model_dir, **overrides):
    base = {"model.base_model": str(tiny_model_dir), "training.epochs": 1, "training.batch_size": 16,
            "training.learning_rate": 1e-3, "training.early_stopping_patience": 0}
    return load_config(None, {**base, **overrides})


@pytest.fixture(scope="module")
def small_data():
    return prepare("demo:reviews", max_rows=160, val_fraction=0.25)


def _lrs(result):
    return [h["learning_rate"] for h in result.log_history if "learning_rate" in h]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "rmsprop", "adagrad"])
def test_each_optimizer_trains(tiny_model_dir, small_data, optimizer):
    result = fit(_config(tiny_model_dir, **{"training.optimizer": optimizer}), small_data, quiet=True)
    assert result.train_rows == len(small_data.train)
    assert any("eval_loss" in h for h in result.log_history)


@pytest.mark.parametrize("scheduler, check", [
    ("step", lambda lrs: lrs[-1] < lrs[0]),
    ("exponential", lambda lrs: all(b <= a for a, b in zip(lrs, lrs[1:]))),
    ("onecycle", lambda lrs: max(lrs) > lrs[0] and lrs[-1] < max(lrs)),
    ("cyclic", lambda lrs: len(set(round(x, 8) for x in lrs)) > 2),
    ("cosine", lambda lrs: lrs[-1] < max(lrs)),
])
def test_schedules_shape_the_learning_rate(tiny_model_dir, small_data, scheduler, check):
    cfg = _config(tiny_model_dir, **{"training.scheduler": scheduler, "training.epochs": 2,
                                     "training.step_size_epochs": 1.0, "training.gamma": 0.5,
                                     "training.warmup_ratio": 0.3})
    lrs = _lrs(fit(cfg, small_data, quiet=True))
    assert len(lrs) >= 3 and check(lrs), lrs


def test_early_stopping_restores_the_best_weights(tiny_model_dir, small_data):
    cfg = _config(tiny_model_dir, **{"training.epochs": 6, "training.evals_per_epoch": 2,
                                     "training.early_stopping_patience": 1, "training.learning_rate": 5e-2,
                                     "training.metric_for_best_model": "loss"})
    result = fit(cfg, small_data, quiet=True)
    evals = [h["eval_loss"] for h in result.log_history if "eval_loss" in h]
    assert result.extra["best_metric"] == pytest.approx(min(evals))
    assert evals.index(min(evals)) < len(evals) - 1, "the run should have stopped after a worse evaluation"
    from finetune.evaluation import softmax
    from finetune.pipeline import evaluate

    ev = evaluate(cfg, result, small_data)
    # The returned weights are the best checkpoint's, not the last: their validation loss is the best one.
    probs = softmax(ev.val_logits)
    nll = -np.log(probs[np.arange(len(probs)), small_data.val.labels]).mean()
    assert nll == pytest.approx(min(evals), rel=1e-3)


def test_auto_class_weights_only_when_imbalanced():
    assert auto_class_weights([0, 1] * 10, 2) is None
    weights = auto_class_weights([0] * 30 + [1] * 10, 2)
    assert weights[1] > weights[0] and weights[1] / weights[0] == pytest.approx(3.0)


def test_imbalance_oversampling_and_augmentation_run(tiny_model_dir, small_data):
    cfg = _config(tiny_model_dir, **{"training.oversample": True, "training.augment": "eda",
                                     "model.freeze_embeddings": True, "model.freeze_layers": 1,
                                     "model.dropout": 0.2, "training.dynamic_padding": False,
                                     "training.group_by_length": False, "training.gradient_accumulation_steps": 2})
    result = fit(cfg, small_data, quiet=True)
    assert result.train_rows > len(small_data.train)  # augmented copies were added


def test_gradual_unfreezing_trains(tiny_model_dir, small_data):
    cfg = _config(tiny_model_dir, **{"model.gradual_unfreezing": True, "training.epochs": 3})
    result = fit(cfg, small_data, quiet=True)
    # After epoch index 2 both encoder layers train: every encoder parameter requires grad.
    assert all(p.requires_grad for p in result.model.base_model.encoder.parameters())


def test_same_seed_same_model(tiny_model_dir, small_data):
    from finetune.pipeline import evaluate

    cfg = _config(tiny_model_dir, **{"training.seed": 7})
    a = evaluate(cfg, fit(cfg, small_data, quiet=True), small_data).val_logits
    b = evaluate(cfg, fit(cfg, small_data, quiet=True), small_data).val_logits
    np.testing.assert_allclose(a, b, atol=1e-5)
    other = _config(tiny_model_dir, **{"training.seed": 8})
    c = evaluate(other, fit(other, small_data, quiet=True), small_data).val_logits
    assert not np.allclose(a, c, atol=1e-5)
