import numpy as np
import pytest

from finetune.evaluation import classification_metrics, expected_calibration_error, fit_temperature, softmax


def _sample(n=4000, k=2, temperature=2.5, seed=0):
    """Labels drawn from softmax(z); the model reports z * temperature (over-confident by T)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, k))
    p = softmax(z)
    labels = np.array([rng.choice(k, p=row) for row in p])
    return z * temperature, labels


def test_temperature_scaling_recovers_the_true_temperature():
    logits, labels = _sample(temperature=2.5)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, t), labels)
    assert after < before / 2


def test_ece_of_a_calibrated_model_is_small():
    logits, labels = _sample(temperature=1.0, n=20000)
    assert expected_calibration_error(softmax(logits), labels) < 0.02


def test_metrics_binary_and_multiclass():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    m = classification_metrics(logits, np.array([0, 1, 1, 0]), ["a", "b"])
    assert m["accuracy"] == 0.5 and m["confusion_matrix"] == [[1, 1], [1, 1]]
    assert m["roc_auc"] == pytest.approx(0.75)
    assert set(m["per_class"]) == {"a", "b"}
    logits3, labels3 = _sample(k=3, n=300, temperature=1.0)
    m3 = classification_metrics(logits3, labels3, ["x", "y", "z"])
    assert 0.5 < m3["roc_auc"] <= 1.0
    assert len(m3["confusion_matrix"]) == 3
    assert m3["f1_macro"] <= 1.0


def test_no_sharpening_when_validation_has_no_errors():
    logits = np.array([[3.0, -3.0], [-2.0, 2.0], [4.0, 0.0]])
    assert fit_temperature(logits, np.array([0, 1, 0])) == 1.0
