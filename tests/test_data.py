import json

import pandas as pd
import pytest

from core.errors import DriftloopError
from finetune.data import Split, augment, demo_path, oversample, prepare


def _rows(n=40):
    return [(f"sample text number {i} is {'good' if i % 2 else 'bad'}", "pos" if i % 2 else "neg") for i in range(n)]


def test_tsv_is_read_without_quote_processing(tmp_path):
    path = tmp_path / "d.tsv"
    lines = ["sentence\tlabel"] + [f'he said "hi {i}\t{i % 2}' for i in range(30)]
    path.write_text("\n".join(lines) + "\n")
    data = prepare(str(path), val_fraction=0.2)
    texts = data.train.texts + data.val.texts
    assert any(t.startswith('he said "hi') for t in texts)
    assert data.label_names == ["0", "1"]
    assert len(texts) == 30


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_formats_and_custom_columns(tmp_path, fmt):
    df = pd.DataFrame(_rows(), columns=["body", "y"])
    path = tmp_path / f"d.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    data = prepare(str(path), text_column="body", label_column="y")
    assert data.label_names == ["neg", "pos"]
    assert len(data.train) + len(data.val) == 40


def test_headerless_two_column_file(tmp_path):
    path = tmp_path / "uci_labelled.txt"
    path.write_text("".join(f"Sentence number {i} here.\t{i % 2}\n" for i in range(20)))
    data = prepare(str(path))
    assert len(data.train) + len(data.val) == 20


def test_cleaning_counts_and_stratified_split(tmp_path):
    rows = _rows(100) + [("  ", "pos"), ("", "neg"), (_rows(1)[0][0], "neg")]  # 2 empty, 1 duplicate
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    data = prepare(str(path), val_fraction=0.2)
    stats = data.cleaning["train"]
    assert stats["read"] == 103 and stats["dropped_empty"] == 2 and stats["dropped_duplicates"] == 1
    assert stats["kept"] == 100
    assert data.val.class_counts(2) == [10, 10]  # stratified


def test_int_and_float_labels_are_one_class(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"t {i}" for i in range(20)], "label": [1.0, 0] * 10}).to_csv(path, index=False)
    assert prepare(str(path)).label_names == ["0", "1"]


def test_max_rows_is_a_stratified_sample(tmp_path):
    data = prepare("demo:reviews", max_rows=100, val_fraction=0.2)
    assert len(data.train) + len(data.val) == 100
    assert data.cleaning["train"]["sampled_to"] == 100


def test_fingerprint_is_stable_and_sensitive():
    a = prepare("demo:reviews", max_rows=200).fingerprint()
    b = prepare("demo:reviews", max_rows=200).fingerprint()
    c = prepare("demo:reviews", max_rows=201).fingerprint()
    assert a == b and a["sha256"] != c["sha256"]
    assert a["splits"]["train"]["rows"] + a["splits"]["val"]["rows"] == 200


def test_max_chars_cuts_and_counts(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"{i:02d} " + "x" * 50 for i in range(10)], "label": [0, 1] * 5}).to_csv(path, index=False)
    data = prepare(str(path), max_chars=20, val_fraction=0.2)
    assert data.cleaning["train"]["cut_to_max_chars"] == 10
    assert all(len(t) <= 20 for t in data.train.texts)


@pytest.mark.parametrize("case, message", [
    ("missing_file", "data file not found"),
    ("missing_column", "label column 'nope' not found"),
    ("empty", "no usable rows"),
    ("single_class", "single class"),
    ("non_utf8", "not valid UTF-8"),
    ("bad_format", "unsupported data format"),
])
def test_bad_input_is_one_clear_error(tmp_path, case, message):
    path = tmp_path / "d.csv"
    kwargs = {}
    if case == "missing_file":
        path = tmp_path / "absent.csv"
    elif case == "missing_column":
        pd.DataFrame(_rows(), columns=["text", "label"]).to_csv(path, index=False)
        kwargs["label_column"] = "nope"
    elif case == "empty":
        path.write_text("text,label\n ,1\n,0\n")
    elif case == "single_class":
        pd.DataFrame({"text": [f"t{i}" for i in range(10)], "label": ["a"] * 10}).to_csv(path, index=False)
    elif case == "non_utf8":
        path.write_bytes(b"text,label\ncaf\xe9 au lait,1\nthe tea,0\n")
    elif case == "bad_format":
        path = tmp_path / "d.xlsx"
        path.write_bytes(b"PK")
    with pytest.raises(DriftloopError, match=message) as err:
        prepare(str(path), **kwargs)
    assert "\n" not in str(err.value)


def test_test_label_unseen_in_training(tmp_path):
    train = tmp_path / "train.csv"
    test = tmp_path / "test.csv"
    pd.DataFrame(_rows(), columns=["text", "label"]).to_csv(train, index=False)
    pd.DataFrame({"text": ["a", "b"], "label": ["pos", "neutral"]}).to_csv(test, index=False)
    with pytest.raises(DriftloopError, match="never seen in training: neutral"):
        prepare(str(train), test_source=str(test))


def test_demo_data_is_shipped_and_balanced():
    for domain in ("reviews", "markets"):
        data = prepare(f"demo:{domain}")
        counts = data.train.class_counts(2)
        assert data.label_names == ["negative", "positive"]
        assert min(counts) / max(counts) > 0.8
    assert demo_path("reviews").is_file()


def test_oversample_balances_and_augment_adds_variants():
    split = Split([f"one two three four {i}" for i in range(12)], [0] * 10 + [1] * 2)
    balanced = oversample(split, seed=1)
    assert balanced.class_counts(2) == [10, 10]
    augmented = augment(split, copies=2, seed=1)
    assert len(augmented) > len(split)
    assert augmented.texts[: len(split)] == split.texts


def test_hf_datasets_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DriftloopError, match=r"driftloop\[hf\]|cannot load Hugging Face dataset 'hf:glue:sst2@train'") as err:
        prepare("hf:glue:sst2@train")
    assert "\n" not in str(err.value)
